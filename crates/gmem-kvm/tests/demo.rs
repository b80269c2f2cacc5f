//! The demo guest runs end to end on /dev/kvm.

use gmem_kvm::{demo_guest, runner::DemoError, VmError};

#[test]
fn demo_guest_runs_every_step() {
    let report = match demo_guest() {
        Err(DemoError::Vm(VmError::Open { errno })) => {
            eprintln!("skipped: /dev/kvm does not open (errno {errno})");
            return;
        }
        r => r.unwrap_or_else(|e| panic!("demo failed: {e}")),
    };
    println!("{report}");
    assert_eq!(report.steps.len(), 7, "{report}");
    assert!(report.steps[6].contains("gmem guest secret"), "{report}");
}

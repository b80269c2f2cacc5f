//! The `gmem` binary, run as a user would.

use std::process::Command;

fn gmem(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("run gmem");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_demo_on_shmem_shows_every_step() {
    let (ok, out, err) = gmem(&["demo", "--backing", "shmem"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("child killed by SIGSEGV (a guard marker on the private page)"),
        "{out}"
    );
    assert!(
        out.contains("refused: page at offset 0x1000 is private (errno 14)"),
        "{out}"
    );
    assert!(out.contains("errno 11, error_offset 0x2000"), "{out}");
    assert!(
        out.contains("\"guest secret: 0xfeedface\" (preserved in place)"),
        "{out}"
    );
}

#[test]
fn cli_demo_on_the_best_backing() {
    let (ok, out, err) = gmem(&["demo"]);
    assert!(ok, "{out}\n{err}");
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm does not open; the demo ran on shmem");
        assert!(out.contains("on shmem"), "{out}");
        return;
    }
    assert!(out.contains("part 1: a guest on /dev/kvm"), "{out}");
    assert!(
        out.contains("host reads the shared page: \"gmem guest secret\""),
        "{out}"
    );
    assert!(out.contains("on kernel guest_memfd through KVM"), "{out}");
    assert!(
        out.contains("child killed by SIGSEGV (a guard marker on the private page)"),
        "{out}"
    );
}

#[test]
fn cli_demo_json() {
    let (ok, out, err) = gmem(&["--json", "demo", "--backing", "shmem"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["walkthrough"].as_array().map(Vec::len), Some(10));
}

#[test]
fn cli_create_applies_conversions() {
    let (ok, out, err) = gmem(&[
        "--json",
        "create",
        "-o",
        "memory-backend-guest-memfd,id=ram0,size=64M,init-shared=on",
        "--convert",
        "1M:4K:private",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[1]["offset"], 1 << 20);
    assert_eq!(runs[1]["attr"], "private");
}

#[test]
fn cli_create_names_the_bad_property() {
    let (ok, _, err) = gmem(&[
        "create",
        "-o",
        "memory-backend-guest-memfd,id=a,size=4K,colour=red",
    ]);
    assert!(!ok);
    assert!(err.contains("property 'colour' not found"), "{err}");
    let (ok, _, err) = gmem(&[
        "create",
        "-o",
        "memory-backend-guest-memfd,id=a,size=4K",
        "--convert",
        "1:4K:private",
    ]);
    assert!(!ok);
    assert!(err.contains("not aligned"), "{err}");
}

#[test]
fn cli_probe_json() {
    let (ok, out, err) = gmem(&["--json", "probe"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let shmem = &v["backings"][0];
    assert_eq!(shmem["backing"], "shmem", "{out}");
    // A guard marker: SIGSEGV (11), SEGV_MAPERR (1), measured.
    assert_eq!(shmem["private_page"], serde_json::json!([11, 1]), "{out}");
    let exceptions = v["exceptions"].as_array().expect("exceptions");
    assert!(exceptions.len() >= 6, "{out}");
    // MADV_GUARD_REMOVE's exception is measurable on every machine with shmem.
    assert_eq!(exceptions[1]["measured"], true, "{out}");
    assert!(
        exceptions
            .iter()
            .all(|e| e["test"].as_str().is_some_and(|t| !t.is_empty())),
        "every exception names its test: {out}"
    );
}

#[test]
fn cli_create_with_policy_and_prealloc() {
    let (ok, out, err) = gmem(&[
        "create",
        "-o",
        "memory-backend-guest-memfd,id=r,size=8M,prealloc=on,host-nodes=0,policy=bind",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("host-nodes=0,policy=bind"), "{out}");
    let (ok, _, err) = gmem(&[
        "create",
        "-o",
        "memory-backend-guest-memfd,id=r,size=8M,host-nodes=1023,policy=bind",
    ]);
    assert!(!ok);
    assert!(err.contains("NUMA node 1023 is not online"), "{err}");
}

#[test]
fn cli_handover_to_a_new_process() {
    let (ok, out, err) = gmem(&[
        "handover",
        "-o",
        "memory-backend-guest-memfd,id=r,size=32M,init-shared=on",
        "--convert",
        "1M:4K:private",
        "--convert",
        "8M:4M:private",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("old owner: 5 run(s)"), "{out}");
    assert!(out.contains("confirmed true"), "{out}");
    assert!(
        out.contains("new owner (generation 1): 32 MiB shmem, 5 run(s)"),
        "{out}"
    );
    assert!(
        out.contains("every byte and every attribute arrived"),
        "{out}"
    );
}

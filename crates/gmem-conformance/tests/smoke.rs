use gmem::{Attr, Flags, GuestMemfd};
use gmem_conformance::probe::{read, Touch};

#[test]
fn smoke_convert_enforces() {
    let mem = GuestMemfd::create(1 << 20, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let v = mem.map(0, 1 << 20).unwrap();
    mem.write_at(4096, b"secret").unwrap();
    mem.convert(4096, 4096, Attr::Private).unwrap();
    unsafe {
        assert_eq!(read(v.as_ptr().add(4096)), Touch::Sigbus(libc::BUS_ADRERR));
        assert_eq!(read(v.as_ptr()), Touch::Ok(0));
    }
    let p = mem.pin(0, 4096).unwrap();
    let e = mem.convert(0, 8192, Attr::Private).unwrap_err();
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(0)));
    drop(p);
    mem.convert(4096, 4096, Attr::Shared).unwrap();
    unsafe { assert_eq!(read(v.as_ptr().add(4096)), Touch::Ok(b's')) };
    // a second view created while pages are private
    mem.convert(0, 4096, Attr::Private).unwrap();
    let v2 = mem.map(0, 8192).unwrap();
    unsafe {
        assert!(read(v2.as_ptr()).is_sigbus());
        assert_eq!(read(v2.as_ptr().add(4096)), Touch::Ok(b's'));
    }
}

fn vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

#[test]
fn smoke_holes_and_edges() {
    let size = 8u64 << 20;
    let mem = GuestMemfd::create(size, Flags::MMAP).unwrap();
    let v = mem.map(0, size).unwrap();
    let at = |o: u64| unsafe { read(v.as_ptr().add(o as usize)) };
    for o in (0..size).step_by(4096) {
        assert!(at(o).is_sigbus(), "{o:#x}");
    }
    mem.guest().write(0x201000, b"x").unwrap();
    mem.convert(0x201000, 4096, Attr::Shared).unwrap();
    assert_eq!(at(0x201000), Touch::Ok(b'x'));
    assert!(at(0x200000).is_sigbus());
    assert!(at(0x202000).is_sigbus());
    assert!(at(0x400000).is_sigbus());
    mem.convert(0, size, Attr::Shared).unwrap();
    for o in (0..size).step_by(4096) {
        assert!(!at(o).is_sigbus(), "{o:#x}");
    }
    assert_eq!(at(0x201000), Touch::Ok(b'x'));
    let before = vmas();
    mem.convert(0x1000, size - 0x2000, Attr::Private).unwrap();
    assert!(at(0x201000).is_sigbus());
    assert_eq!(at(0), Touch::Ok(0));
    assert_eq!(at(size - 4096), Touch::Ok(0));
    mem.convert(0, size, Attr::Shared).unwrap();
    assert_eq!(at(0x201000), Touch::Ok(b'x'));
    assert!(vmas() <= before + 1, "{} vs {}", vmas(), before);
}

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

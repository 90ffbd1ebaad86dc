//! Tests of the pickle interpreter (src/model/formats/pickle.rs).

use super::*;

#[test]
fn protocol_2_state_dict() {
    // collections.OrderedDict() with one tensor entry, as torch.save writes it.
    let mut p = vec![0x80, 2];
    p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w");
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storage");
    p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)Rtr\x03\x00\x00\x00Ru.");
    let (v, n) = load(&p).unwrap();
    assert_eq!(n, p.len());
    let entries = v.dict_entries().unwrap();
    assert_eq!(entries.len(), 1);
    let Value::Tensor(t) = &entries[0].1 else { panic!("{:?}", entries[0].1) };
    assert_eq!((t.shape.clone(), t.strides.clone(), t.offset), (vec![2, 3], vec![3, 1], 0));
    assert_eq!(t.storage.dtype, StorageDtype::F32);
    assert_eq!(t.storage.numel, 6);
}

#[test]
fn refuses_callables_outside_the_allowlist() {
    for (module, name) in
        [("posix", "system"), ("builtins", "eval"), ("__builtin__", "exec"), ("mypkg", "Model")]
    {
        let mut p = vec![0x80, 2];
        p.extend(format!("c{module}\n{name}\nX\u{2}\u{0}\u{0}\u{0}ls").as_bytes());
        p.extend(b"\x85R.");
        let err = load(&p).unwrap_err();
        assert!(err.contains(&format!("{module}.{name}")), "{err}");
    }
    // STACK_GLOBAL too.
    let err = load(b"\x80\x04\x8c\x02os\x8c\x06system\x93.").unwrap_err();
    assert!(err.contains("os.system"), "{err}");
}

#[test]
fn truncated_and_malformed_pickles_are_errors() {
    assert!(load(b"\x80\x02X\xff\x00\x00\x00abc").unwrap_err().contains("truncated"));
    assert!(load(b"\x80\x02.").is_err());
    assert!(load(b"\x80\x02h\x05.").unwrap_err().contains("memo"));
    assert!(load(b"\x80\x02r\xff\xff\xff\x7f.").is_err());
    assert!(load(b"\xff").unwrap_err().contains("unknown pickle opcode"));
}

#[test]
fn deep_nesting_and_repeated_keys() {
    // A million nested 1-tuples, then an error: freed without recursion (no stack overflow).
    let mut p = vec![0x80, 2, b'N'];
    p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    p.push(0xff);
    assert!(load(&p).unwrap_err().contains("unknown pickle opcode"));
    // {"a": 1, "a": 2}: the last value counts.
    let (v, _) = load(b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00aK\x02u.").unwrap();
    let e = v.dict_entries().unwrap();
    assert_eq!(e.len(), 1);
    assert!(matches!(e[0].1, Value::Int(2)));
}

#[test]
fn memo_fetches_share_the_object() {
    // l = []; l.append(1) through the memo copy: the list on the stack sees it.
    let (v, _) = load(b"\x80\x02]q\x00h\x00K\x01a0.").unwrap();
    let Value::List(l) = v else { panic!() };
    assert_eq!(l.borrow().len(), 1);
}

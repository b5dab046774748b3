//! Tests for the header module: round trips, interop with the `safetensors` crate, and
//! hostile headers (each rejected with the variant naming the broken rule, never a panic).

use super::*;
use proptest::prelude::*;

/// Builds a whole file image: prefix + JSON + `data_len` bytes of data.
fn file_with(json: &str, data_len: usize) -> (Vec<u8>, u64) {
    let mut f = (json.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f.extend(std::iter::repeat_n(0u8, data_len));
    let size = f.len() as u64;
    (f, size)
}

fn parse_str(json: &str, data_len: usize) -> Result<SafetensorsHeader, HeaderError> {
    let (file, size) = file_with(json, data_len);
    let n = header_len_from_prefix(&file, size)?;
    parse_header(&file[8..8 + n as usize], size)
}

fn entry(dtype: &str, shape: &str, offsets: &str) -> String {
    format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}"#)
}

#[test]
fn parses_valid_header_sorted_by_offset() {
    let json = format!(
        r#"{{"__metadata__":{{"format":"pt"}},"b":{},"a":{},"z":{}}}   "#,
        entry("BF16", "[2,3]", "[8,20]"),
        entry("F32", "[2]", "[0,8]"),
        entry("F32", "[0]", "[20,20]")
    );
    let h = parse_str(&json, 20).unwrap();
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "z"]);
    assert_eq!(h.metadata["format"], "pt");
    assert_eq!(h.header_len, json.len() as u64);
    assert_eq!(h.data_start(), 8 + json.len() as u64);
    let b = h.tensor("b").unwrap();
    assert_eq!((b.num_elements(), b.byte_len()), (6, 12));
    assert!(h.tensor("missing").is_none());
}

#[test]
fn prefix_checks() {
    assert!(matches!(
        header_len_from_prefix(&[1, 0, 0], 100),
        Err(HeaderError::FileTooShort { needed: 8, .. })
    ));
    assert!(matches!(
        header_len_from_prefix(&50u64.to_le_bytes(), 40),
        Err(HeaderError::FileTooShort {
            needed: 58,
            file_size: 40
        })
    ));
    assert!(matches!(
        header_len_from_prefix(&u64::MAX.to_le_bytes(), u64::MAX),
        Err(HeaderError::HeaderTooLarge { .. })
    ));
    assert!(matches!(
        header_len_from_prefix(&0u64.to_le_bytes(), 100),
        Err(HeaderError::EmptyHeader)
    ));
    assert_eq!(header_len_from_prefix(&2u64.to_le_bytes(), 10), Ok(2));
}

#[test]
fn rejects_bad_json_and_non_objects() {
    assert!(matches!(
        parse_str("{not json", 0),
        Err(HeaderError::InvalidJson(_))
    ));
    assert!(matches!(
        parse_str("{} x", 0),
        Err(HeaderError::InvalidJson(_))
    ));
    assert!(matches!(
        parse_str("[1,2]", 0),
        Err(HeaderError::NotAnObject { found: "an array" })
    ));
    assert!(matches!(
        parse_str(r#"{"t":[1]}"#, 0),
        Err(HeaderError::InvalidEntry { tensor, .. }) if tensor == "t"
    ));
    // The JSON length must fit inside the file.
    assert!(matches!(
        parse_header(b"{}", 5),
        Err(HeaderError::FileTooShort { needed: 10, .. })
    ));
}

#[test]
fn rejects_out_of_bounds_offsets() {
    let json = format!(r#"{{"t":{}}}"#, entry("U8", "[10]", "[0,10]"));
    assert_eq!(
        parse_str(&json, 9),
        Err(HeaderError::OffsetsOutOfBounds {
            tensor: "t".into(),
            end: 10,
            data_len: 9
        })
    );
    assert!(parse_str(&json, 10).is_ok());
}

#[test]
fn rejects_overlap_and_allows_empty_tensors_only_at_tensor_boundaries() {
    let json = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("U8", "[10]", "[0,10]"),
        entry("U8", "[4]", "[6,10]")
    );
    assert_eq!(
        parse_str(&json, 10),
        Err(HeaderError::Overlap {
            first: "a".into(),
            second: "b".into()
        })
    );
    // Same offsets twice: the second one overlaps the first.
    let json = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("U8", "[4]", "[0,4]"),
        entry("U8", "[4]", "[0,4]")
    );
    assert!(matches!(
        parse_str(&json, 4),
        Err(HeaderError::Overlap { .. })
    ));
    // An empty tensor inside another's data breaks contiguity (reference: InvalidOffset).
    let json = format!(
        r#"{{"a":{},"e":{}}}"#,
        entry("U8", "[10]", "[0,10]"),
        entry("U8", "[0]", "[5,5]")
    );
    assert_eq!(
        parse_str(&json, 10),
        Err(HeaderError::Overlap {
            first: "a".into(),
            second: "e".into()
        })
    );
    // At a boundary (start, between two tensors, end), empty tensors are fine.
    let json = format!(
        r#"{{"a":{},"e0":{},"b":{},"e1":{},"e2":{}}}"#,
        entry("U8", "[4]", "[0,4]"),
        entry("U8", "[0]", "[0,0]"),
        entry("U8", "[6]", "[4,10]"),
        entry("F32", "[2,0]", "[4,4]"),
        entry("U8", "[0]", "[10,10]")
    );
    let h = parse_str(&json, 10).unwrap();
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["e0", "a", "e1", "b", "e2"]);
}

#[test]
fn rejects_gaps_between_tensors_and_a_nonzero_start() {
    let json = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("U8", "[2]", "[0,2]"),
        entry("U8", "[2]", "[4,6]")
    );
    assert_eq!(
        parse_str(&json, 6),
        Err(HeaderError::Gap {
            tensor: "b".into(),
            begin: 4,
            expected: 2
        })
    );
    let json = format!(r#"{{"a":{}}}"#, entry("U8", "[2]", "[2,4]"));
    assert_eq!(
        parse_str(&json, 4),
        Err(HeaderError::Gap {
            tensor: "a".into(),
            begin: 2,
            expected: 0
        })
    );
    // A lone empty tensor must sit at 0 too.
    let json = format!(r#"{{"e":{}}}"#, entry("F16", "[0]", "[3,3]"));
    assert!(matches!(
        parse_str(&json, 3),
        Err(HeaderError::Gap { tensor, begin: 3, expected: 0 }) if tensor == "e"
    ));
    let msg = parse_str(&json, 3).unwrap_err().to_string();
    assert!(msg.contains("\"e\"") && msg.contains("contiguous"), "{msg}");
}

#[test]
fn offsets_in_any_json_order_are_fine_when_contiguous() {
    let json = format!(
        r#"{{"c":{},"a":{},"b":{}}}"#,
        entry("U8", "[1]", "[3,4]"),
        entry("U8", "[1]", "[0,1]"),
        entry("U16", "[1]", "[1,3]")
    );
    let h = parse_str(&json, 4).unwrap();
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn rejects_data_not_exactly_covered_by_the_tensors() {
    // One byte after the last tensor (reference: MetadataIncompleteBuffer).
    let json = format!(r#"{{"a":{}}}"#, entry("U8", "[4]", "[0,4]"));
    assert_eq!(
        parse_str(&json, 5),
        Err(HeaderError::DataNotCovered {
            last: Some("a".into()),
            covered: 4,
            data_len: 5
        })
    );
    let msg = parse_str(&json, 5).unwrap_err().to_string();
    assert!(
        msg.contains("\"a\"") && msg.contains("end of the file"),
        "{msg}"
    );
    // No tensors at all, but data bytes.
    assert_eq!(
        parse_str("{}", 1),
        Err(HeaderError::DataNotCovered {
            last: None,
            covered: 0,
            data_len: 1
        })
    );
    assert!(parse_str("{}", 0).unwrap().tensors.is_empty());
    assert!(parse_str(&json, 4).is_ok());
}

#[test]
fn a_header_length_one_byte_off_is_rejected_not_shifted() {
    // The JSON is padded, so it still parses when `n` is one short; every tensor would then
    // read its data one byte early.
    let json = format!(r#"{{"a":{}}}  "#, entry("U8", "[4]", "[0,4]"));
    let (mut file, size) = file_with(&json, 4);
    file[..8].copy_from_slice(&(json.len() as u64 - 1).to_le_bytes());
    let n = header_len_from_prefix(&file, size).unwrap();
    assert_eq!(
        parse_header(&file[8..8 + n as usize], size),
        Err(HeaderError::DataNotCovered {
            last: Some("a".into()),
            covered: 4,
            data_len: 5
        })
    );
    // One long: the JSON takes the first data byte (here whitespace) and the data is short.
    let (mut file, size) = file_with(&json, 4);
    file[8 + json.len()] = b' ';
    file[..8].copy_from_slice(&(json.len() as u64 + 1).to_le_bytes());
    let n = header_len_from_prefix(&file, size).unwrap();
    assert!(matches!(
        parse_header(&file[8..8 + n as usize], size),
        Err(HeaderError::OffsetsOutOfBounds {
            end: 4,
            data_len: 3,
            ..
        })
    ));
}

#[test]
fn header_cap_is_the_references_decimal_100_mb() {
    assert_eq!(MAX_HEADER_BYTES, 100_000_000);
    let big = 200_000_000;
    assert_eq!(
        header_len_from_prefix(&100_000_000u64.to_le_bytes(), big),
        Ok(100_000_000)
    );
    for n in [100_000_001u64, 100 * 1024 * 1024] {
        assert_eq!(
            header_len_from_prefix(&n.to_le_bytes(), big),
            Err(HeaderError::HeaderTooLarge {
                len: n,
                max: 100_000_000
            })
        );
    }
}

#[test]
fn rejects_invalid_utf8_and_accepts_json_whitespace_around_the_object() {
    let json = b"{\"\xff\":{}}";
    assert_eq!(
        parse_header(json, 8 + json.len() as u64),
        Err(HeaderError::InvalidUtf8 { valid_up_to: 2 })
    );
    let e = entry("U8", "[1]", "[0,1]");
    // Like the reference, no `{`-first rule; JSON whitespace either side is allowed.
    for json in [format!(" \n{{\"t\":{e}}}"), format!("{{\"t\":{e}}}\t\r\n ")] {
        assert!(parse_str(&json, 1).is_ok(), "{json:?}");
    }
    for json in [format!("{{\"t\":{e}}}\0"), format!("\u{feff}{{\"t\":{e}}}")] {
        assert!(
            matches!(parse_str(&json, 1), Err(HeaderError::InvalidJson(_))),
            "{json:?}"
        );
    }
}

#[test]
fn stricter_than_the_reference_on_purpose() {
    // The reference accepts all of these (null metadata, last duplicate wins, unknown fields
    // ignored); a header that can mean two things is rejected here.
    let e = entry("U8", "[1]", "[0,1]");
    assert!(matches!(
        parse_str(&format!(r#"{{"__metadata__":null,"t":{e}}}"#), 1),
        Err(HeaderError::InvalidMetadata { .. })
    ));
    assert!(matches!(
        parse_str(&format!(r#"{{"t":{e},"t":{e}}}"#), 1),
        Err(HeaderError::DuplicateTensor { .. })
    ));
    assert!(matches!(
        parse_str(
            r#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}}"#,
            1
        ),
        Err(HeaderError::InvalidEntry { .. })
    ));
    assert!(matches!(
        parse_str(
            r#"{"t":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
            1
        ),
        Err(HeaderError::UnknownDtype { .. })
    ));
}

#[test]
fn rejects_unknown_dtype_and_bad_shapes() {
    let json = format!(r#"{{"t":{}}}"#, entry("Q4", "[1]", "[0,1]"));
    assert!(
        matches!(parse_str(&json, 1), Err(HeaderError::UnknownDtype { dtype, .. }) if dtype == "Q4")
    );
    let huge = format!("[{},{}]", u64::MAX, 2);
    let json = format!(r#"{{"t":{}}}"#, entry("U8", &huge, "[0,1]"));
    assert!(matches!(
        parse_str(&json, 1),
        Err(HeaderError::ShapeOverflow { .. })
    ));
    let json = format!(r#"{{"t":{}}}"#, entry("F32", "[3]", "[0,8]"));
    assert_eq!(
        parse_str(&json, 8),
        Err(HeaderError::ShapeMismatch {
            tensor: "t".into(),
            expected_bytes: 12,
            actual_bytes: 8
        })
    );
    for shape in ["[-1]", "[1.5]", "[\"2\"]", "3", "[1e30]"] {
        let json = format!(r#"{{"t":{}}}"#, entry("U8", shape, "[0,1]"));
        assert!(
            matches!(parse_str(&json, 1), Err(HeaderError::InvalidEntry { .. })),
            "{shape}"
        );
    }
    for offsets in ["[1,0]", "[0]", "[0,1,2]", "[-1,0]"] {
        let json = format!(r#"{{"t":{}}}"#, entry("U8", "[0]", offsets));
        assert!(
            matches!(parse_str(&json, 1), Err(HeaderError::InvalidEntry { .. })),
            "{offsets}"
        );
    }
}

#[test]
fn rejects_missing_unknown_and_duplicate_fields() {
    for json in [
        r#"{"t":{"dtype":"U8","shape":[1]}}"#,
        r#"{"t":{"shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}}"#,
        r#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"shape":[1]}}"#,
        r#"{"t":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}"#,
    ] {
        assert!(
            matches!(parse_str(json, 1), Err(HeaderError::InvalidEntry { .. })),
            "{json}"
        );
    }
}

#[test]
fn rejects_duplicate_keys_and_bad_metadata() {
    let e = entry("U8", "[1]", "[0,1]");
    let json = format!(r#"{{"t":{e},"t":{e}}}"#);
    assert_eq!(
        parse_str(&json, 1),
        Err(HeaderError::DuplicateTensor { tensor: "t".into() })
    );
    for json in [
        r#"{"__metadata__":{"a":"1","a":"2"}}"#,
        r#"{"__metadata__":{"a":1}}"#,
        r#"{"__metadata__":[]}"#,
        r#"{"__metadata__":{},"__metadata__":{}}"#,
    ] {
        assert!(
            matches!(
                parse_str(json, 0),
                Err(HeaderError::InvalidMetadata { .. } | HeaderError::DuplicateTensor { .. })
            ),
            "{json}"
        );
    }
}

fn sample() -> Vec<(String, DType, Vec<u64>)> {
    vec![
        ("model.embed \"quoted\"".into(), DType::BF16, vec![4, 3]),
        ("scalar".into(), DType::F32, vec![]),
        ("empty".into(), DType::F16, vec![0, 5]),
        ("ints".into(), DType::I64, vec![2]),
    ]
}

#[test]
fn encode_layout_is_contiguous_and_aligned() {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let (prefix, offsets) = encode_header(&sample(), &meta).unwrap();
    assert_eq!(prefix.len() % 8, 0);
    assert_eq!(offsets, vec![(0, 24), (24, 28), (28, 28), (28, 44)]);
    let text = std::str::from_utf8(&prefix[8..]).unwrap();
    assert!(text.starts_with(r#"{"__metadata__":{"format":"pt"},"model.embed"#));
    let (prefix, _) = encode_header(&[], &BTreeMap::new()).unwrap();
    assert_eq!(&prefix[8..10], b"{}");
}

#[test]
fn encode_rejects_duplicates_reserved_and_overflow() {
    let m = BTreeMap::new();
    let dup = vec![
        ("a".into(), DType::U8, vec![1]),
        ("a".into(), DType::U8, vec![1]),
    ];
    assert!(matches!(
        encode_header(&dup, &m),
        Err(HeaderError::DuplicateTensor { .. })
    ));
    let reserved = vec![(METADATA_KEY.into(), DType::U8, vec![1])];
    assert!(matches!(
        encode_header(&reserved, &m),
        Err(HeaderError::InvalidEntry { .. })
    ));
    let big = vec![
        ("a".into(), DType::U8, vec![u64::MAX]),
        ("b".into(), DType::U8, vec![1]),
    ];
    assert!(matches!(
        encode_header(&big, &m),
        Err(HeaderError::ShapeOverflow { .. })
    ));
}

#[test]
fn safetensors_crate_reads_what_we_write() {
    let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let tensors = sample();
    let (mut file, offsets) = encode_header(&tensors, &meta).unwrap();
    let data_len = offsets.last().unwrap().1 as usize;
    let data: Vec<u8> = (0..data_len).map(|i| (i * 7 % 251) as u8).collect();
    file.extend_from_slice(&data);
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(st.len(), tensors.len());
    for ((name, dtype, shape), (b, e)) in tensors.iter().zip(&offsets) {
        let view = st.tensor(name).unwrap();
        assert_eq!(format!("{:?}", view.dtype()), dtype.as_safetensors());
        let shape_usize: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
        assert_eq!(view.shape(), shape_usize.as_slice());
        assert_eq!(view.data(), &data[*b as usize..*e as usize]);
    }
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    assert_eq!(st_meta.metadata().as_ref().unwrap()["k"], "v");
}

#[test]
fn we_read_what_the_safetensors_crate_writes() {
    let a: Vec<u8> = (0..24).collect();
    let b: Vec<u8> = vec![1; 8];
    let views = vec![
        (
            "w".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![3, 4], &a).unwrap(),
        ),
        (
            "b".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &b).unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    let size = bytes.len() as u64;
    let n = header_len_from_prefix(&bytes, size).unwrap();
    let h = parse_header(&bytes[8..8 + n as usize], size).unwrap();
    let w = h.tensor("w").unwrap();
    assert_eq!((w.dtype, w.shape.clone()), (DType::BF16, vec![3, 4]));
    let start = (h.data_start() + w.data_offsets.0) as usize;
    assert_eq!(&bytes[start..start + 24], a.as_slice());
}

fn arb_tensors() -> impl Strategy<Value = Vec<(String, DType, Vec<u64>)>> {
    let dtypes = prop::sample::select(vec![
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::U8,
        DType::I64,
    ]);
    let one = (
        "[a-z_.\"\\\\\u{e9}0-9]{1,12}",
        dtypes,
        prop::collection::vec(0u64..6, 0..4),
    );
    prop::collection::vec(one, 0..8).prop_map(|mut v| {
        let mut seen = HashSet::new();
        v.retain(|(n, _, _)| n != METADATA_KEY && seen.insert(n.clone()));
        v
    })
}

proptest! {
    #[test]
    fn encode_then_parse_round_trips(
        tensors in arb_tensors(),
        meta in prop::collection::btree_map("[a-z\"]{0,5}", "[ -~]{0,8}", 0..3),
    ) {
        let (prefix, offsets) = encode_header(&tensors, &meta).unwrap();
        let data_len = offsets.last().map_or(0, |o| o.1);
        let size = prefix.len() as u64 + data_len;
        let n = header_len_from_prefix(&prefix, size).unwrap();
        let h = parse_header(&prefix[8..], size).unwrap();
        prop_assert_eq!(n, h.header_len);
        prop_assert_eq!(&h.metadata, &meta);
        prop_assert_eq!(h.tensors.len(), tensors.len());
        for ((name, dtype, shape), offs) in tensors.iter().zip(&offsets) {
            let t = h.tensor(name).unwrap();
            prop_assert_eq!((t.dtype, &t.shape, t.data_offsets), (*dtype, shape, *offs));
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), size in any::<u64>()) {
        let _ = header_len_from_prefix(&bytes, size);
        let _ = parse_header(&bytes, size);
    }

    #[test]
    fn random_json_like_text_never_panics(text in "[\\{\\}\\[\\]\",:0-9a-z_ -]{0,120}", size in 0u64..1000) {
        let _ = parse_header(text.as_bytes(), size);
    }
}

/// One way to damage a valid file, as a hostile or broken writer would.
#[derive(Debug, Clone)]
enum Mutation {
    /// Adds the delta to the 8-byte header length, leaving the bytes alone.
    Length(i64),
    /// Overwrites the header byte at `pos % n`.
    HeaderByte(usize, u8),
    /// Replaces the `index % count`-th number of the JSON text (shapes, offsets).
    Number(usize, &'static str),
    /// Drops the JSON's trailing padding but keeps the length (shifting the data).
    TrimPadding,
    /// Appends zero bytes to the file.
    Append(usize),
    /// Cuts bytes off the end of the file.
    Truncate(usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop::sample::select(vec![
        b' ', b'{', b'}', b'"', b'0', b'1', b',', b'-', 0xff, 0,
    ]);
    let number = prop::sample::select(vec![
        "0",
        "1",
        "2",
        "3",
        "4",
        "6",
        "8",
        "12",
        "24",
        "28",
        "44",
        "-1",
        "1.0",
        "1e1",
        "-0",
        "9223372036854775807",
        "4294967296",
        "18446744073709551616",
    ]);
    prop_oneof![
        (-3i64..=3).prop_map(Mutation::Length),
        (any::<usize>(), byte).prop_map(|(p, b)| Mutation::HeaderByte(p, b)),
        (any::<usize>(), number).prop_map(|(i, t)| Mutation::Number(i, t)),
        Just(Mutation::TrimPadding),
        (1usize..9).prop_map(Mutation::Append),
        (1usize..9).prop_map(Mutation::Truncate),
    ]
}

/// Byte ranges of the JSON numbers that follow `[` or `,` (shape and offset entries).
fn number_runs(json: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < json.len() {
        let start = i;
        while i < json.len() && json[i].is_ascii_digit() {
            i += 1;
        }
        if i > start && start > 0 && matches!(json[start - 1], b'[' | b',') {
            runs.push(start..i);
        }
        i = i.max(start + 1);
    }
    runs
}

fn mutate(file: &[u8], m: &Mutation) -> Vec<u8> {
    let Some(n) = file
        .get(..8)
        .map(|p| u64::from_le_bytes(p.try_into().unwrap()))
    else {
        return file.to_vec();
    };
    let Some(json) = file.get(8..).and_then(|rest| rest.get(..n as usize)) else {
        return file.to_vec();
    };
    let data = &file[8 + json.len()..];
    let rebuild = |json: &[u8], len: u64| {
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(json);
        out.extend_from_slice(data);
        out
    };
    match m {
        Mutation::Length(d) => rebuild(json, n.saturating_add_signed(*d)),
        Mutation::HeaderByte(pos, b) if !json.is_empty() => {
            let mut json = json.to_vec();
            let i = pos % json.len();
            json[i] = *b;
            rebuild(&json, n)
        }
        Mutation::Number(index, text) => {
            let runs = number_runs(json);
            if runs.is_empty() {
                return file.to_vec();
            }
            let r = runs[index % runs.len()].clone();
            let mut edited = json[..r.start].to_vec();
            edited.extend_from_slice(text.as_bytes());
            edited.extend_from_slice(&json[r.end..]);
            rebuild(&edited, edited.len() as u64)
        }
        Mutation::TrimPadding => {
            let mut out = n.to_le_bytes().to_vec();
            out.extend_from_slice(json.trim_ascii_end());
            out.extend_from_slice(data);
            out
        }
        Mutation::Append(k) => {
            let mut out = file.to_vec();
            out.extend(std::iter::repeat_n(0u8, *k));
            out
        }
        Mutation::Truncate(k) => file[..file.len().saturating_sub(*k)].to_vec(),
        Mutation::HeaderByte(..) => file.to_vec(),
    }
}

fn ours(file: &[u8]) -> Result<SafetensorsHeader, HeaderError> {
    let size = file.len() as u64;
    let n = header_len_from_prefix(file, size)?;
    parse_header(&file[8..8 + n as usize], size)
}

/// Our rules that are deliberately stricter than the reference's.
fn stricter_than_reference(e: &HeaderError) -> bool {
    match e {
        HeaderError::DuplicateTensor { .. }
        | HeaderError::InvalidMetadata { .. }
        | HeaderError::UnknownDtype { .. } => true,
        HeaderError::InvalidEntry { reason, .. } => reason.starts_with("unknown field"),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Differential test against the reference loader (the `safetensors` crate): whatever it
    /// rejects we reject, and where only we reject it is one of our deliberately stricter rules.
    #[test]
    fn rejects_exactly_what_the_reference_rejects(
        tensors in arb_tensors(),
        meta in prop::collection::btree_map("[a-z]{0,3}", "[ -~]{0,4}", 0..2),
        mutations in prop::collection::vec(arb_mutation(), 1..3),
    ) {
        let (mut file, offsets) = encode_header(&tensors, &meta).unwrap();
        let data_len = offsets.last().map_or(0, |o| o.1) as usize;
        file.extend((0..data_len).map(|i| i as u8));
        prop_assert!(ours(&file).is_ok());
        prop_assert!(safetensors::SafeTensors::read_metadata(&file).is_ok());
        for m in &mutations {
            file = mutate(&file, m);
        }
        match (ours(&file), safetensors::SafeTensors::read_metadata(&file)) {
            (Ok(h), Err(e)) => prop_assert!(false, "reference rejects ({e}), we accept {h:?}"),
            (Err(e), Ok(_)) => prop_assert!(
                stricter_than_reference(&e),
                "we reject ({e}) a file the reference accepts"
            ),
            _ => {}
        }
    }
}

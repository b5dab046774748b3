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
fn rejects_overlap_but_allows_empty_tensors_anywhere() {
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
    let json = format!(
        r#"{{"a":{},"e":{}}}"#,
        entry("U8", "[10]", "[0,10]"),
        entry("U8", "[0]", "[5,5]")
    );
    assert!(parse_str(&json, 10).is_ok());
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

//! Calibration / evaluation data: plain text (one sample per non-empty line) or JSONL (every
//! non-empty line a JSON object with a string `text` field).
//!
//! JSONL is recognised by the first non-empty line starting with `{`; from then on every
//! non-empty line must be such an object. Errors name the source and the 1-based line, so a
//! user can fix the file; a file without a single sample is an error, not an empty run.

use serde_json::Value;

use crate::ModelError;

fn bad(source: &str, line: usize, message: impl std::fmt::Display) -> ModelError {
    ModelError::BadCalibration(format!("{source} line {line}: {message}"))
}

/// Parses calibration / evaluation samples; `source` names the file in errors.
pub fn parse_samples(bytes: &[u8], source: &str) -> Result<Vec<String>, ModelError> {
    let text = std::str::from_utf8(bytes).map_err(|error| {
        let line = 1 + bytes[..error.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        bad(source, line, "not valid UTF-8 text")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = text
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .enumerate()
        .map(|(index, line)| (index + 1, line))
        .filter(|(_, line)| !line.trim().is_empty());
    let jsonl = text
        .split('\n')
        .find(|line| !line.trim().is_empty())
        .is_some_and(|line| line.trim_start().starts_with('{'));
    let samples = if jsonl {
        lines
            .map(|(number, line)| json_text(line, source, number))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        lines.map(|(_, line)| line.to_string()).collect()
    };
    if samples.is_empty() {
        return Err(ModelError::BadCalibration(format!(
            "{source} holds no sample (expected one text per line, or JSONL with a \"text\" field)"
        )));
    }
    Ok(samples)
}

/// The `text` field of one JSONL line.
fn json_text(line: &str, source: &str, number: usize) -> Result<String, ModelError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|error| bad(source, number, format!("not valid JSON ({error})")))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad(source, number, "not a JSON object"))?;
    match object.get("text") {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
        Some(Value::String(_)) => Err(bad(source, number, "the \"text\" field is empty")),
        Some(other) => Err(bad(
            source,
            number,
            format!("the \"text\" field is not a string but {other}"),
        )),
        None => Err(bad(source, number, "no \"text\" field")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<Vec<String>, ModelError>) -> String {
        match result {
            Err(ModelError::BadCalibration(message)) => message,
            other => panic!("expected BadCalibration, got {other:?}"),
        }
    }

    #[test]
    fn plain_text_gives_one_sample_per_non_empty_line() {
        let samples = parse_samples(
            b"\xef\xbb\xbfFirst line.\r\n\n   \nSecond, with {braces}.\nlast",
            "cal.txt",
        )
        .unwrap();
        assert_eq!(samples, ["First line.", "Second, with {braces}.", "last"]);
    }

    #[test]
    fn jsonl_reads_the_text_field_and_skips_blank_lines() {
        let data = b"\n{\"text\": \"one\", \"id\": 1}\n\n  {\"text\": \"two \\u00e9\"}\r\n";
        assert_eq!(
            parse_samples(data, "cal.jsonl").unwrap(),
            ["one", "two \u{e9}"]
        );
    }

    #[test]
    fn a_bad_jsonl_line_is_named_with_its_number() {
        let error = message(parse_samples(
            b"{\"text\": \"ok\"}\n\n{\"text\": oops}\n",
            "cal.jsonl",
        ));
        assert!(
            error.starts_with("cal.jsonl line 3: not valid JSON"),
            "{error}"
        );
        let error = message(parse_samples(
            b"{\"text\": \"ok\"}\n{\"prompt\": \"x\"}",
            "d.jsonl",
        ));
        assert_eq!(error, "d.jsonl line 2: no \"text\" field");
        let error = message(parse_samples(b"{\"text\": 5}", "d.jsonl"));
        assert!(
            error.contains("line 1") && error.contains("not a string"),
            "{error}"
        );
        let error = message(parse_samples(b"{\"text\": \"a\"}\n[1, 2]", "d.jsonl"));
        assert_eq!(error, "d.jsonl line 2: not a JSON object");
    }

    #[test]
    fn empty_and_non_utf8_files_are_refused() {
        assert!(message(parse_samples(b"", "empty.txt")).contains("empty.txt holds no sample"));
        assert!(message(parse_samples(b"\n \r\n\t\n", "blank.txt")).contains("no sample"));
        assert_eq!(
            message(parse_samples(b"ok\nbad \xff\n", "x.txt")),
            "x.txt line 2: not valid UTF-8 text"
        );
    }
}

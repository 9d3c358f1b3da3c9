//! How deeply published `data` nests, measured with a byte scan.
//!
//! `data` is checked to be one JSON value, then passed through as raw bytes: it is never parsed into
//! a tree, so serde_json's recursion limit never applies to it, and a value nested tens of thousands
//! of levels deep would be fanned out to clients whose JSON parsers fail on it (most stop at a few
//! hundred levels, serde_json at 128). Counting the brackets of text already known to be valid JSON
//! is exact and costs one pass over the bytes, far less than building the tree.

use crate::protocol::{ErrorCode, ProtocolError};

/// The nesting depth of a valid JSON text: 0 for a scalar, 1 for `[]` or `{"a":1}`, 2 for `[[]]`,
/// and so on. Brackets inside strings (escaped quotes included) do not count. The node only needs
/// [`exceeds`]; the full measure is what the tests compare with a parser.
#[cfg(test)]
pub fn depth(json: &[u8]) -> usize {
    let mut deepest = 0;
    scan(json, |d| {
        deepest = deepest.max(d);
        true
    });
    deepest
}

/// Whether a valid JSON text nests deeper than `max` levels (see [`depth`]). Stops at the first
/// bracket past the limit.
pub fn exceeds(json: &[u8], max: usize) -> bool {
    !scan(json, |d| d <= max)
}

/// Refuses `data` nested deeper than `max` levels (`limits.max_json_depth`) with `bad_request`,
/// naming the limit.
pub fn check(data: &[u8], max: usize) -> Result<(), ProtocolError> {
    if exceeds(data, max) {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            format!("data is nested deeper than limits.max_json_depth ({max} levels)"),
        ));
    }
    Ok(())
}

/// Calls `opened` with the depth reached at every `[` or `{` outside strings; stops and returns
/// false as soon as it returns false.
fn scan(json: &[u8], mut opened: impl FnMut(usize) -> bool) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            // Inside a string only `\` and `"` matter: every other byte, UTF-8 included, is text.
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if !opened(depth) {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    #[test]
    fn counts_levels_not_brackets_in_strings() {
        let cases: [(&str, usize); 12] = [
            ("1", 0),
            (r#""[{""#, 0),
            ("[]", 1),
            ("{}", 1),
            (r#"{"a":[1,{"b":[]}]}"#, 4),
            ("[[],[],[[]]]", 3),
            (r#"["[[[[", "]]]]]]"]"#, 1),
            (r#"["\"[[", {"k\\":"\\"}]"#, 2),
            (r#"{"\\\"{{":"}}\\\\"}"#, 1),
            (r#"[ "é[😀" , [ ] ]"#, 2),
            (" [ [ 1 ] , 2 ] ", 2),
            (r#"{"a":"\u005b\u007b"}"#, 1),
        ];
        for (json, want) in cases {
            assert!(serde_json::from_str::<Value>(json).is_ok(), "{json}");
            assert_eq!(depth(json.as_bytes()), want, "{json}");
            assert!(!exceeds(json.as_bytes(), want), "{json}");
            if want > 0 {
                assert!(exceeds(json.as_bytes(), want - 1), "{json}");
            }
        }
    }

    #[test]
    fn a_value_tens_of_thousands_deep_is_refused_with_the_limit_named() {
        let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
        assert_eq!(depth(deep.as_bytes()), 50_000);
        let e = check(deep.as_bytes(), 128).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(
            e.message,
            "data is nested deeper than limits.max_json_depth (128 levels)"
        );
        let at_limit = format!("{}1{}", "{\"a\":".repeat(128), "}".repeat(128));
        assert!(check(at_limit.as_bytes(), 128).is_ok());
        assert!(check(format!("[{at_limit}]").as_bytes(), 128).is_err());
    }

    /// The depth of a parsed value, for comparison.
    fn tree_depth(v: &Value) -> usize {
        match v {
            Value::Array(items) => 1 + items.iter().map(tree_depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(tree_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Strings full of what could fool a scan: brackets, quotes, backslashes, non-ASCII.
    fn tricky_string() -> impl Strategy<Value = String> {
        "[\\[\\]{}\"\\\\:,a é😀\\u{1}]{0,12}"
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            tricky_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(12, 96, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((tricky_string(), inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn scan_depth_equals_the_parsed_depth(v in json_value(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&v)
            } else {
                serde_json::to_string(&v)
            };
            let text = text.expect("serializes");
            let want = tree_depth(&v);
            prop_assert_eq!(depth(text.as_bytes()), want, "{}", text);
            prop_assert!(!exceeds(text.as_bytes(), want));
            prop_assert_eq!(exceeds(text.as_bytes(), want.saturating_sub(1)), want > 0);
        }
    }
}

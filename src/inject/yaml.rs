//! YAML manifests as `kubectl` reads them: documents split on `---` lines (kept as
//! written, so untouched documents come out byte for byte), a leading UTF-8 BOM
//! ignored, merge keys (`<<: *anchor`) applied, and deep nesting refused before the
//! parser sees it (libyaml's scanner is quadratic in flow nesting depth).

use serde_json::Value;
use serde_norway::Value as Yaml;
use thiserror::Error;

/// Deepest flow nesting (`[`, `{`) accepted; serde_norway stops at 128 levels anyway.
pub const MAX_FLOW_DEPTH: usize = 128;

#[derive(Debug, Error)]
pub enum YamlError {
    #[error("line {line}: nested more than {MAX_FLOW_DEPTH} levels deep")]
    TooDeep { line: usize },
    #[error("{0}")]
    Parse(#[from] serde_norway::Error),
    #[error("not a Kubernetes object: {0}")]
    NotJson(#[from] serde_json::Error),
}

/// `input` without a leading UTF-8 byte order mark (Windows editors write one).
pub fn strip_bom(input: &str) -> &str {
    input.strip_prefix('\u{feff}').unwrap_or(input)
}

/// Splits on `---` lines, keeping the separators: documents are at even indexes,
/// separators at odd ones, and the parts concatenate back to `input`.
pub fn split_documents(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_sep = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_sep {
            parts.push(&input[start..pos]);
            parts.push(&input[pos..pos + line.len()]);
            start = pos + line.len();
        }
        pos += line.len();
    }
    parts.push(&input[start..]);
    parts
}

/// Parses one document (no `---` inside) into JSON with merge keys applied; an empty
/// document is `Null`.
pub fn parse_document(doc: &str) -> Result<Value, YamlError> {
    check_flow_depth(doc)?;
    let mut yaml: Yaml = serde_norway::from_str(doc)?;
    apply_merge_keys(&mut yaml)?;
    Ok(serde_json::to_value(&yaml)?)
}

/// Refuses flow nesting deeper than `MAX_FLOW_DEPTH` in two linear passes: one that
/// skips quoted scalars and one that does not. Where a quote starts is not always
/// clear without the full grammar (a plain scalar may continue on a line that begins
/// with one), so each pass covers the other's blind spot; comments never count.
pub fn check_flow_depth(doc: &str) -> Result<(), YamlError> {
    flow_depth_pass(doc, true)?;
    flow_depth_pass(doc, false)
}

fn flow_depth_pass(doc: &str, quotes: bool) -> Result<(), YamlError> {
    let bytes = doc.as_bytes();
    let mut depth = 0usize;
    let mut line = 1usize;
    // At a place where a node may begin (a quote there starts a quoted scalar).
    let mut node_start = true;
    let mut prev_blank = true;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let next_blank = bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace());
        match b {
            b'\n' => {
                line += 1;
                node_start = true;
            }
            b' ' | b'\t' | b'\r' => {}
            b'#' if prev_blank => {
                while i + 1 < bytes.len() && bytes[i + 1] != b'\n' {
                    i += 1;
                }
            }
            b'\'' | b'"' if node_start && quotes => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\n' => line += 1,
                        b'\\' if b == b'"' => i += 1,
                        c if c == b && b == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 1,
                        c if c == b => break,
                        _ => {}
                    }
                    i += 1;
                }
                node_start = false;
            }
            b'[' | b'{' if node_start || depth > 0 => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(YamlError::TooDeep { line });
                }
                node_start = true;
            }
            b']' | b'}' if depth > 0 => {
                depth -= 1;
                node_start = false;
            }
            b',' if depth > 0 => node_start = true,
            b'-' | b'?' | b':' if next_blank || (b == b':' && depth > 0) => node_start = true,
            _ => node_start = false,
        }
        prev_blank = b.is_ascii_whitespace();
        i += 1;
    }
    Ok(())
}

/// Applies YAML 1.1 merge keys as kubectl (go-yaml) does: keys of the mapping itself
/// win over merged ones, and in `<<: [*a, *b]` the earlier source wins. Depth is
/// bounded by the parser's recursion limit.
pub fn apply_merge_keys(value: &mut Yaml) -> Result<(), serde_norway::Error> {
    match value {
        Yaml::Mapping(map) => {
            for (_, v) in map.iter_mut() {
                apply_merge_keys(v)?;
            }
            if let Some(sources) = map.remove("<<") {
                let sources = match sources {
                    Yaml::Sequence(s) => s,
                    one => vec![one],
                };
                for source in sources {
                    let Yaml::Mapping(source) = source else {
                        return Err(serde::de::Error::custom(
                            "a merge key (<<) must name a mapping or a list of mappings",
                        ));
                    };
                    for (k, v) in source {
                        map.entry(k).or_insert(v);
                    }
                }
            }
        }
        Yaml::Sequence(items) => {
            for v in items {
                apply_merge_keys(v)?;
            }
        }
        Yaml::Tagged(t) => apply_merge_keys(&mut t.value)?,
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn split_keeps_separators_and_text() {
        let input = "a: 1\n---\nb: 2\n--- # c\n\nc: 3";
        let parts = split_documents(input);
        assert_eq!(parts, ["a: 1\n", "---\n", "b: 2\n", "--- # c\n", "\nc: 3"]);
        assert_eq!(parts.concat(), input);
        assert_eq!(split_documents("x: '---'\n"), ["x: '---'\n"]);
    }

    #[test]
    fn deep_flow_nesting_is_refused_quickly() {
        let deep = format!("spec: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let err = parse_document(&deep).unwrap_err();
        assert!(matches!(err, YamlError::TooDeep { line: 1 }), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let ok = format!("a: {}{}\n", "{b: ".repeat(20), "}".repeat(20));
        parse_document(&ok).unwrap();
    }

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        let many = "[".repeat(500);
        for doc in [
            format!("a: '{many}'\n"),
            format!("a: \"{many}\"\n"),
            format!("a: x # {many}\n"),
            format!("a: it's {many}\n"),
            format!("a: |\n  x{many}\n"),
        ] {
            check_flow_depth(&doc).unwrap_or_else(|e| panic!("{doc:.20}: {e}"));
        }
        // A quote in the middle of a plain scalar opens nothing.
        let doc = format!("a: [x'y, {}{}]\n", "[".repeat(200), "]".repeat(200));
        assert!(check_flow_depth(&doc).is_err());
    }

    #[test]
    fn a_quote_the_parser_reads_as_plain_text_hides_nothing() {
        // Line 2 continues the plain scalar "b 'x"; the brackets on line 3 are real.
        let doc = format!("a: b\n  'x\nc: {}\n", "[".repeat(200));
        assert!(matches!(
            check_flow_depth(&doc),
            Err(YamlError::TooDeep { line: 3 })
        ));
    }

    #[test]
    fn bom_is_stripped() {
        assert_eq!(strip_bom("\u{feff}a: 1\n"), "a: 1\n");
        assert_eq!(strip_bom("a: 1\n"), "a: 1\n");
    }

    #[test]
    fn merge_keys_as_kubectl() {
        let doc = "base: &b {name: app, image: x, ports: [{containerPort: 8080}]}\n\
                   more: &m {<<: *b, image: m, extra: 1}\n\
                   one: {<<: *b, image: y}\n\
                   two: {<<: [*m, *b], name: two}\n";
        let v = parse_document(doc).unwrap();
        assert_eq!(
            v["one"],
            json!({"name": "app", "image": "y", "ports": [{"containerPort": 8080}]})
        );
        assert_eq!(
            v["two"],
            json!({"name": "two", "image": "m", "extra": 1, "ports": [{"containerPort": 8080}]})
        );
        assert!(parse_document("a: {<<: 3}\n").is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON values as manifests hold them (no `<<` keys), a few levels deep.
        fn manifest_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i32>().prop_map(Value::from),
                "[ -~]{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z][a-z0-9./-]{0,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(128)))]

            /// Any text: the parts give back the input, and parsing never panics.
            #[test]
            fn any_text_splits_back_and_parses_without_panic(
                text in "([ -~]|\n|\t|---\n|<<: \\*a\n|&a |\\[|\\{|\u{feff}){0,200}"
            ) {
                let parts = split_documents(&text);
                prop_assert_eq!(parts.concat(), text.clone());
                for doc in parts.iter().step_by(2) {
                    let _ = parse_document(doc);
                }
            }

            /// What serde_norway writes, we read back (the depth check and merge keys
            /// leave ordinary documents alone), block and flow style alike.
            #[test]
            fn written_documents_read_back(value in manifest_value()) {
                let block = serde_norway::to_string(&value).unwrap();
                prop_assert_eq!(&parse_document(&block).unwrap(), &value);
                let flow = serde_json::to_string(&value).unwrap();
                prop_assert_eq!(&parse_document(&flow).unwrap(), &value);
            }

            /// Nesting beyond the limit is refused in linear time, whatever the brackets.
            #[test]
            fn deep_nesting_refused(
                opens in prop::collection::vec(prop_oneof![Just("["), Just("{a: ")], MAX_FLOW_DEPTH + 1..4 * MAX_FLOW_DEPTH)
            ) {
                let doc = format!("a: {}", opens.concat());
                let refused = matches!(parse_document(&doc), Err(YamlError::TooDeep { .. }));
                prop_assert!(refused);
            }
        }
    }
}

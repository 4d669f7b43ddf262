//! The reconnect hint carried in the close frame's reason (docs/reconnect-hint.md).

use thiserror::Error;

pub const DEFAULT_TEMPLATE: &str = r#"{"reconnect_after_ms":{after_ms}}"#;
/// A close frame's payload is at most 125 bytes, 2 of which are the code.
pub const MAX_REASON_BYTES: usize = 123;
const PLACEHOLDER: &str = "{after_ms}";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HintError {
    #[error("the template must contain {PLACEHOLDER}")]
    NoPlaceholder,
    #[error("the reason is {0} bytes; a close reason holds at most {MAX_REASON_BYTES}")]
    TooLong(usize),
    #[error("the template must not contain control characters")]
    Control,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintTemplate(String);

impl Default for HintTemplate {
    fn default() -> Self {
        Self(DEFAULT_TEMPLATE.to_owned())
    }
}

impl HintTemplate {
    pub fn parse(template: &str) -> Result<Self, HintError> {
        if !template.contains(PLACEHOLDER) {
            return Err(HintError::NoPlaceholder);
        }
        if template.chars().any(char::is_control) {
            return Err(HintError::Control);
        }
        let t = Self(template.to_owned());
        t.render(0)?;
        Ok(t)
    }

    /// The close reason for one batch.
    pub fn render(&self, after_ms: u64) -> Result<String, HintError> {
        let reason = self.0.replace(PLACEHOLDER, &after_ms.to_string());
        if reason.len() > MAX_REASON_BYTES {
            return Err(HintError::TooLong(reason.len()));
        }
        Ok(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_renders_json() {
        let r = HintTemplate::default().render(1200).unwrap();
        assert_eq!(r, r#"{"reconnect_after_ms":1200}"#);
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["reconnect_after_ms"], 1200);
    }

    #[test]
    fn custom_shape_and_limits() {
        let t = HintTemplate::parse(r#"{"type":"reconnect","in":{after_ms}}"#).unwrap();
        assert_eq!(t.render(5).unwrap(), r#"{"type":"reconnect","in":5}"#);
        assert_eq!(
            HintTemplate::parse("no placeholder"),
            Err(HintError::NoPlaceholder)
        );
        let long = format!("{}{{after_ms}}", "x".repeat(125));
        assert!(matches!(
            HintTemplate::parse(&long),
            Err(HintError::TooLong(_))
        ));
        assert_eq!(
            HintTemplate::parse("a\n{after_ms}"),
            Err(HintError::Control)
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(1024)))]
            /// Any template a user can pass: parsed or refused with a reason, never a
            /// panic; a parsed one renders every delay within the close-frame limit
            /// (the agent checks the largest delay at start).
            #[test]
            fn any_template(t in "\\PC{0,140}", after in any::<u64>()) {
                let with_placeholder = format!("{t}{PLACEHOLDER}");
                for candidate in [t.as_str(), with_placeholder.as_str()] {
                    if let Ok(h) = HintTemplate::parse(candidate) {
                        match h.render(after) {
                            Ok(r) => {
                                prop_assert!(r.len() <= MAX_REASON_BYTES);
                                prop_assert!(r.contains(&after.to_string()));
                            }
                            Err(HintError::TooLong(n)) => prop_assert!(n > MAX_REASON_BYTES),
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                }
            }

            /// The default template renders JSON a client can read back.
            #[test]
            fn default_is_json(after in 0u64..3_600_000) {
                let r = HintTemplate::default().render(after).unwrap();
                let v: serde_json::Value = serde_json::from_str(&r).unwrap();
                prop_assert_eq!(v["reconnect_after_ms"].as_u64(), Some(after));
            }
        }
    }
}

//! Value types and parsers shared by every subcommand: durations, duration ranges, ports,
//! close codes, admin URLs. Each parser returns a message that says what was wrong with
//! the value; callers prefix it with the flag or annotation that held it.

use std::time::Duration;

/// Longest duration any option accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses Go/Kubernetes-style durations: `250ms`, `25s`, `1m30s`, `1.5s`, `2h`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration (use e.g. 250ms, 25s or 1m30s)".into());
    }
    if s.starts_with('-') {
        return Err(format!("'{s}' is negative; durations are 0 or more"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) && s != "0" {
        return Err(format!(
            "'{s}' has no unit (use ms, s, m or h, e.g. 250ms, 25s or 1m30s)"
        ));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("'{s}' is out of range (0 to 24h)"));
    }
    Ok(d)
}

/// Formats a duration the way `parse_duration` reads it back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `MIN..MAX` (e.g. `0ms..2s`) or a single duration for a fixed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

pub fn parse_range(s: &str) -> Result<DurationRange, String> {
    let (min, max) = match s.split_once("..") {
        Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
        None => {
            let d = parse_duration(s)?;
            (d, d)
        }
    };
    if min > max {
        return Err(format!("'{s}': the minimum is larger than the maximum"));
    }
    Ok(DurationRange { min, max })
}

/// A TCP port, 1-65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err("0 is not allowed (ports are 1-65535)".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("'{s}' is not a port number (1-65535)")),
    }
}

/// Close codes a client library will accept from a server for "go away, come back".
/// 1000 is never sent: some clients then refuse to reconnect.
pub fn check_close_code(code: u16) -> Result<(), String> {
    match code {
        1001 | 1012 | 4000..=4999 => Ok(()),
        _ => Err(format!(
            "{code} is not allowed (use 1012, 1001 or 4000-4999)"
        )),
    }
}

/// An RFC 1035 label, as Kubernetes names Services: 1–63 lower-case letters, digits and
/// `-`, starting with a letter and not ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
}

/// An admin API base URL: `http://HOST:PORT[/prefix]`, trailing `/` dropped. Used by the
/// agent (`--admin-url`) and the injector (`wsdrain.io/admin-url`).
pub fn parse_admin_url(raw: &str) -> Result<hyper::Uri, String> {
    // Checked as written; a trailing `/` is only dropped from a valid URL (trimming
    // `http://` first would leave `http:` and a misleading message).
    let trimmed = match raw.strip_prefix("http://") {
        Some(rest) if !rest.trim_end_matches('/').is_empty() => raw.trim_end_matches('/'),
        Some(_) => return Err(format!("'{raw}' has no host (e.g. http://127.0.0.1:8081)")),
        None => raw,
    };
    let uri: hyper::Uri = trimmed
        .parse()
        .map_err(|e| format!("'{raw}' is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "'{raw}' must start with http:// (the admin API is plain HTTP on loopback)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("'{raw}' has no host (e.g. http://127.0.0.1:8081)"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("25").unwrap_err().contains("no unit"));
        assert!(parse_duration("5x").unwrap_err().contains("not a duration"));
        assert!(parse_duration("ms").unwrap_err().contains("not a duration"));
        assert!(parse_duration("48h").unwrap_err().contains("range"));
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(25)), "25s");
    }

    /// What users paste from Kubernetes and Go tools.
    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(
            parse_duration("1m30s500ms"),
            Ok(Duration::from_millis(90_500))
        );
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
    }

    #[test]
    fn ranges() {
        let r = parse_range("0ms..2s").unwrap();
        assert_eq!((r.min, r.max), (Duration::ZERO, Duration::from_secs(2)));
        let fixed = parse_range("500ms").unwrap();
        assert_eq!(fixed.min, fixed.max);
        assert!(parse_range("2s..1s").unwrap_err().contains("larger"));
        assert_eq!(
            parse_range("1m..1m30s").unwrap().max,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn ports_codes_urls() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").unwrap_err().contains("0 is not allowed"));
        assert!(parse_port("70000").unwrap_err().contains("not a port"));
        assert!(check_close_code(1012).is_ok());
        assert!(check_close_code(1000).is_err());
        assert!(parse_admin_url("http://127.0.0.1:8081/").is_ok());
        assert!(
            parse_admin_url("http://")
                .unwrap_err()
                .contains("'http://'")
        );
        assert!(parse_admin_url("ftp://x").unwrap_err().contains("http://"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(512)))]
            /// Any string: an answer, never a panic; a parsed value is within range.
            #[test]
            fn duration_never_panics(s in "\\PC{0,24}") {
                if let Ok(d) = parse_duration(&s) {
                    prop_assert!(d <= MAX_DURATION);
                }
                let _ = parse_range(&s);
            }

            #[test]
            fn formatted_durations_read_back(ms in 0u64..86_400_000) {
                let d = Duration::from_millis(ms);
                prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
            }

            #[test]
            fn go_compound_durations(m in 0u64..600, s in 0u64..60, ms in 0u64..1000) {
                let text = format!("{m}m{s}s{ms}ms");
                let want = Duration::from_millis(m * 60_000 + s * 1000 + ms);
                prop_assert_eq!(parse_duration(&text), Ok(want));
            }
        }
    }
}

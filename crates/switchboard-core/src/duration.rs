//! The duration syntax of every Switchboard flag: `500ms`, `30s`, `2m`, `1h`, or a bare number
//! of seconds (fractions allowed, `1.5s`).
//!
//! It lives in the core so that a protocol's `Config` can parse its own duration options and
//! print its defaults in the same syntax the runtime's flags use.

use std::time::Duration;

/// Why a duration text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The number part is missing or not a number, or the value does not fit a [`Duration`].
    #[error("invalid duration `{0}` (try 500ms, 30s, 2m)")]
    Invalid(String),
    /// The unit is not `ms`, `s`, `m` or `h`.
    #[error("unknown duration unit `{0}` (use ms, s, m or h)")]
    UnknownUnit(String),
}

/// Parses `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| DurationError::Invalid(text.to_owned()))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(DurationError::UnknownUnit(other.to_owned())),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| DurationError::Invalid(text.to_owned()))
}

/// Writes `duration` in the syntax [`parse`] reads, in the largest unit that keeps it whole
/// (`1h`, `5m`, `15s`, `250ms`; `0s`), or in seconds with a fraction below a millisecond.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    let whole_millis = duration.subsec_nanos().is_multiple_of(1_000_000);
    if duration.is_zero() {
        "0s".to_owned()
    } else if !whole_millis {
        let fraction = format!("{:09}", duration.subsec_nanos());
        format!("{}.{}s", duration.as_secs(), fraction.trim_end_matches('0'))
    } else if millis.is_multiple_of(3_600_000) {
        format!("{}h", millis / 3_600_000)
    } else if millis.is_multiple_of(60_000) {
        format!("{}m", millis / 60_000)
    } else if millis.is_multiple_of(1_000) {
        format!("{}s", millis / 1_000)
    } else {
        format!("{millis}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse(" 10 s "), Ok(Duration::from_secs(10)));
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        assert_eq!(
            parse("soon"),
            Err(DurationError::Invalid("soon".to_owned()))
        );
        assert_eq!(parse("5y"), Err(DurationError::UnknownUnit("y".to_owned())));
        assert!(parse("").is_err());
        assert!(parse("1e400").is_err());
        assert!(parse("99999999999999999999999h").is_err());
    }

    #[test]
    fn formats_what_it_parses() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(10), "10ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(15), "15s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_nanos(1_000_000_001), "1.000000001s"),
            (Duration::from_micros(1500), "0.0015s"),
        ] {
            assert_eq!(format(duration), text);
            assert_eq!(parse(text), Ok(duration), "{text}");
        }
    }
}

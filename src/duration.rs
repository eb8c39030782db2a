//! Durations as flags and messages write them: a whole number of seconds, minutes or hours
//! (`90s`, `15m`, `1h`), for every flag that takes one (the operator's timeouts, the retry
//! budget of the CLI, the agent and the operator).

use std::time::Duration;

/// `90s`, `15m`, `1h` (a whole number, more than zero).
pub fn parse(value: &str) -> Result<Duration, String> {
    let (number, unit) = value.split_at(value.len().saturating_sub(1));
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if scale > 0 && n > 0 => Ok(Duration::from_secs(n * scale)),
        _ => Err(format!(
            "`{value}` is not a duration: write a whole number of seconds, minutes or hours such as 90s, 15m or 1h"
        )),
    }
}

/// As [`parse`] reads it back: `2h`, `15m`, `90s`.
pub fn format(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_units_round_trip_and_the_rest_is_refused() {
        for text in ["90s", "15m", "2h"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        for bad in ["", "0s", "5", "1.5m", "-3s", "3d"] {
            assert!(parse(bad).unwrap_err().contains("such as 90s"), "{bad}");
        }
    }
}

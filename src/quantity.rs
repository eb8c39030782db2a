//! Kubernetes quantities of bytes, as the API writes them (`512Mi`, `1.5Gi`, `2G`, `1073741824`).

/// Bytes of a quantity of memory or storage; `None` when `text` is not one (`500m`, `lots`).
pub fn bytes(text: &str) -> Option<u64> {
    let value = text.trim();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "Pi" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    match number.parse::<f64>() {
        Ok(n) if n >= 0.0 => Some((n * multiplier) as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(bytes("10Gi"), Some(10 << 30));
        assert_eq!(bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(bytes("2G"), Some(2_000_000_000));
        assert_eq!(bytes("1073741824"), Some(1 << 30));
        assert_eq!(bytes("500m"), None);
        assert_eq!(bytes("lots"), None);
        assert_eq!(bytes(""), None);
    }
}

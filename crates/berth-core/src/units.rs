//! Sizes as users write them on the command line: `512M`, `2GiB`, `1.5G`,
//! `1000000`. Suffixes are binary (`K` = 1024), as `sbatch --mem` reads them.

/// Parses a size into bytes.
pub fn parse_size(text: &str) -> Result<i64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let multiplier: f64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "invalid size {text:?}: expected a number with an optional unit K, M, G or T, for example 512M"
            ))
        }
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional unit K, M, G or T, for example 512M")
    })?;
    let bytes = (value * multiplier).round();
    if !(bytes >= 1.0 && bytes < i64::MAX as f64) {
        return Err(format!("invalid size {text:?}: must be at least 1 byte"));
    }
    Ok(bytes as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4k"), Ok(4096));
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in ["", "M", "-1", "0", "12X", "1..2G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}

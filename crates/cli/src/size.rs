//! Sizes on the command line: `4096`, `64K`, `64M`, `1.5G`, `2GiB`.

/// Parses a size in bytes with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let bad = || {
        format!(
            "invalid size '{s}': expected a number with an optional K, M, G or T suffix, e.g. 64M"
        )
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * mult as f64 >= u64::MAX as f64 {
        return Err(bad());
    }
    let bytes = v * mult as f64;
    if bytes.fract() != 0.0 {
        return Err(format!(
            "invalid size '{s}': not a whole number of bytes ({bytes} bytes)"
        ));
    }
    Ok(bytes as u64)
}

pub use lego_protocol::control::human_bytes as human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        for bad in ["", "abc", "-1M", "0", "12Q", "1e400", "0.1", "1.5", "0.3K"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}

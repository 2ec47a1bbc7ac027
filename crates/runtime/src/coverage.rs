//! Coverage: how much of a process's anonymous memory lives outside the
//! disaggregated region (thread stacks, libraries' written data, memory
//! mapped with flags the runtime leaves local), read from
//! `/proc/self/smaps`.

/// Bytes of `Anonymous:` memory in mappings outside `[start, end)`.
pub fn anonymous_outside(smaps: &str, start: usize, end: usize) -> u64 {
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(range) = line
            .split(' ')
            .next()
            .filter(|r| r.contains('-') && r.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        {
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let a = usize::from_str_radix(a, 16).unwrap_or(0);
            let b = usize::from_str_radix(b, 16).unwrap_or(0);
            inside = a >= start && b <= end;
        } else if let Some(rest) = line.strip_prefix("Anonymous:") {
            if !inside {
                let kb: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kb * 1024;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_mappings_outside_the_region() {
        let smaps = "\
1000-3000 rw-p 00000000 00:00 0 
Size:                  8 kB
Anonymous:             8 kB
10000-20000 rw-p 00000000 00:00 0 
Anonymous:            64 kB
7fff0000-7fff1000 rw-p 00000000 00:00 0                  [stack]
Anonymous:             4 kB
";
        assert_eq!(anonymous_outside(smaps, 0x10000, 0x20000), 12 * 1024);
    }
}

//! Byte sizes as users write them (`8MiB`, `1GiB`, `1000`).

/// Parses a byte size: digits, then an optional unit (`B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB` are
/// powers of 1024; `KB`, `MB`, `GB` powers of 1000). Case-insensitive; spaces allowed.
pub fn parse_size(raw: &str) -> Option<u64> {
    let s = raw.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number: u64 = s[..digits].parse().ok()?;
    let scale: u64 = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// The shortest exact form of a size for messages: `8MiB`, `1000`.
pub fn format_size(n: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= scale && n % scale == 0 {
            return format!("{}{unit}", n / scale);
        }
    }
    n.to_string()
}

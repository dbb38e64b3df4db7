//! FNV-1a 64, the hash behind every deduplication id we write (`Nats-Msg-Id` of the front
//! door's messages and of dead-letter entries). Hand-written so its value never changes with
//! a dependency, the compiler or the replica: an id made by one version must match the one
//! made by the next, which `DefaultHasher` does not promise.

/// An FNV-1a 64 hasher.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Feeds `bytes` as they are.
    pub fn bytes(mut self, bytes: &[u8]) -> Fnv1a {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// Feeds one part of several: its length first, so parts cannot run into each other
    /// (`ab`+`c` and `a`+`bc` differ).
    pub fn part(self, bytes: &[u8]) -> Fnv1a {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Fnv1a;

    /// The published FNV-1a 64 test vectors: a change here would change every id.
    #[test]
    fn matches_the_published_vectors() {
        for (input, hash) in [
            (&b""[..], 0xcbf2_9ce4_8422_2325_u64),
            (b"a", 0xaf63_dc4c_8601_ec8c),
            (b"foobar", 0x8594_4171_f739_67e8),
        ] {
            assert_eq!(Fnv1a::default().bytes(input).finish(), hash, "{input:?}");
        }
    }

    #[test]
    fn parts_cannot_run_into_each_other() {
        let h = |parts: &[&[u8]]| {
            parts
                .iter()
                .fold(Fnv1a::default(), |h, p| h.part(p))
                .finish()
        };
        assert_ne!(h(&[b"ab", b"c"]), h(&[b"a", b"bc"]));
        assert_eq!(h(&[b"ab", b"c"]), h(&[b"ab", b"c"]));
    }
}

//! The preprocessing cache: one file per set of inputs, named by a SHA-256 of everything the
//! examples depend on, checked by a checksum when read and rebuilt when it does not verify.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::supervised::Example;

const MAGIC: &[u8; 8] = b"FFDATA\0\x01";
/// Bump when the encoding rules change, so caches made by older builds are not reused.
const RULES_VERSION: &str = "ff-data supervised v1";

/// Builds the cache key from named parts; lengths are hashed too, so parts cannot run together.
pub(crate) struct KeyHasher(Sha256);

impl KeyHasher {
    pub(crate) fn new() -> Self {
        let mut hasher = Self(Sha256::new());
        hasher.part("rules", RULES_VERSION.as_bytes());
        hasher
    }

    pub(crate) fn part(&mut self, name: &str, bytes: &[u8]) {
        for piece in [name.as_bytes(), bytes] {
            self.0.update((piece.len() as u64).to_le_bytes());
            self.0.update(piece);
        }
    }

    /// The file's contents, or a marker that it does not exist.
    pub(crate) fn file(&mut self, path: &Path) -> std::io::Result<()> {
        let name = path.to_string_lossy();
        match std::fs::read(path) {
            Ok(bytes) => self.part(&name, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.part(&name, b"<absent>"),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What a cache file holds.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CachedData {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub pad_token_id: u32,
}

pub(crate) fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("ff-data-{key}.bin"))
}

fn encode_examples(out: &mut Vec<u8>, examples: &[Example]) {
    out.extend((examples.len() as u64).to_le_bytes());
    for e in examples {
        out.extend((e.input_ids.len() as u64).to_le_bytes());
        out.extend(e.input_ids.iter().flat_map(|t| t.to_le_bytes()));
        out.extend((e.labels.len() as u64).to_le_bytes());
        out.extend(e.labels.iter().flat_map(|t| t.to_le_bytes()));
    }
}

/// The file bytes: magic, payload length, payload, SHA-256 of the payload.
pub(crate) fn to_bytes(data: &CachedData) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend(data.pad_token_id.to_le_bytes());
    encode_examples(&mut payload, &data.train);
    encode_examples(&mut payload, &data.eval);
    let mut out = Vec::with_capacity(payload.len() + 48);
    out.extend(MAGIC);
    out.extend((payload.len() as u64).to_le_bytes());
    out.extend(&payload);
    out.extend(Sha256::digest(&payload));
    out
}

/// Reads little-endian values off a byte slice; `None` once it runs out.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn len(&mut self) -> Option<usize> {
        let n = u64::from_le_bytes(self.take()?);
        // A length larger than what is left is corruption, not a reason to allocate.
        usize::try_from(n).ok().filter(|n| *n <= self.0.len())
    }

    fn examples(&mut self) -> Option<Vec<Example>> {
        let count = self.len()?;
        let mut examples = Vec::with_capacity(count);
        for _ in 0..count {
            let n = self.len()?;
            let input_ids = (0..n)
                .map(|_| self.take().map(u32::from_le_bytes))
                .collect::<Option<_>>()?;
            let n = self.len()?;
            let labels = (0..n)
                .map(|_| self.take().map(i64::from_le_bytes))
                .collect::<Option<_>>()?;
            examples.push(Example { input_ids, labels });
        }
        Some(examples)
    }
}

/// The data of a cache file, or `None` when it is truncated, altered or not a cache file.
pub(crate) fn from_bytes(bytes: &[u8]) -> Option<CachedData> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (length, rest) = rest.split_first_chunk::<8>()?;
    let length = usize::try_from(u64::from_le_bytes(*length)).ok()?;
    if rest.len() != length.checked_add(32)? {
        return None;
    }
    let (payload, checksum) = rest.split_at(length);
    if Sha256::digest(payload).as_slice() != checksum {
        return None;
    }
    let mut reader = Reader(payload);
    let pad_token_id = u32::from_le_bytes(reader.take()?);
    let train = reader.examples()?;
    let eval = reader.examples()?;
    reader.0.is_empty().then_some(CachedData {
        train,
        eval,
        pad_token_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CachedData {
        CachedData {
            train: vec![
                Example {
                    input_ids: vec![1, 2, 3],
                    labels: vec![-100, 2, 3],
                },
                Example {
                    input_ids: vec![],
                    labels: vec![],
                },
            ],
            eval: vec![Example {
                input_ids: vec![u32::MAX],
                labels: vec![i64::MIN],
            }],
            pad_token_id: 7,
        }
    }

    #[test]
    fn round_trips() {
        assert_eq!(from_bytes(&to_bytes(&sample())), Some(sample()));
    }

    #[test]
    fn any_damage_is_detected() {
        let bytes = to_bytes(&sample());
        for cut in [0, 7, 16, bytes.len() - 1] {
            assert_eq!(from_bytes(&bytes[..cut]), None, "cut at {cut}");
        }
        for flip in [3, 12, 20, bytes.len() - 5] {
            let mut damaged = bytes.clone();
            damaged[flip] ^= 0x40;
            assert_eq!(from_bytes(&damaged), None, "flipped byte {flip}");
        }
    }

    #[test]
    fn key_depends_on_every_part() {
        let key = |parts: &[(&str, &[u8])]| {
            let mut h = KeyHasher::new();
            for (name, bytes) in parts {
                h.part(name, bytes);
            }
            h.finish()
        };
        let base = key(&[("a", b"xy"), ("b", b"z")]);
        assert_eq!(base, key(&[("a", b"xy"), ("b", b"z")]));
        assert_ne!(base, key(&[("a", b"x"), ("b", b"yz")]));
        assert_ne!(base, key(&[("a", b"xy"), ("b", b"Z")]));
        assert_eq!(base.len(), 64);
    }
}

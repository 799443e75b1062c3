//! Little-endian encoding of the few field kinds that the store protocol and the launcher's
//! records carry. Decoding trusts no length it reads: every read checks what is left, so a
//! corrupt or hostile message becomes an error instead of a panic or a huge allocation.

use std::time::Duration;

/// A message that does not decode: truncated, with trailing bytes, or with invalid text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DecodeError(pub(crate) String);

/// Appends fields to a byte buffer.
#[derive(Default)]
pub(crate) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn u8(&mut self, value: u8) -> &mut Self {
        self.buf.push(value);
        self
    }

    pub(crate) fn u32(&mut self, value: u32) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub(crate) fn i64(&mut self, value: i64) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Milliseconds, saturating: a timeout of centuries means "no practical limit".
    pub(crate) fn duration(&mut self, value: Duration) -> &mut Self {
        self.u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    /// A length-prefixed byte string. Messages are capped far below 4 GiB (see the store's
    /// frame limit), so a u32 length always fits.
    pub(crate) fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.u32(value.len() as u32);
        self.buf.extend_from_slice(value);
        self
    }

    pub(crate) fn str(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    /// A u8 presence flag followed by the bytes when present.
    pub(crate) fn optional_bytes(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(bytes) => self.u8(1).bytes(bytes),
            None => self.u8(0),
        }
    }

    /// A u32 count followed by each string.
    pub(crate) fn strings<S: AsRef<str>>(&mut self, values: &[S]) -> &mut Self {
        self.u32(values.len() as u32);
        for value in values {
            self.str(value.as_ref());
        }
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Reads fields back in the order they were written.
pub(crate) struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError(format!(
                "message ends early: {what} needs {n} bytes but only {} remain",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>("a tag byte")?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array("a 32-bit number")?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array("a 64-bit number")?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array("a 64-bit number")?))
    }

    pub(crate) fn duration(&mut self) -> Result<Duration, DecodeError> {
        Ok(Duration::from_millis(self.u64()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len, "a byte string")
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DecodeError("a text field is not valid UTF-8".into()))
    }

    pub(crate) fn optional_bytes(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?.to_vec())),
            flag => Err(DecodeError(format!(
                "presence flag {flag} is neither 0 nor 1"
            ))),
        }
    }

    pub(crate) fn strings(&mut self) -> Result<Vec<String>, DecodeError> {
        let count = self.u32()? as usize;
        // Each string needs at least its 4-byte length, which bounds a lying count.
        if count > self.rest.len() / 4 {
            return Err(DecodeError(format!(
                "a list claims {count} strings but the message is too short for them"
            )));
        }
        (0..count).map(|_| self.string()).collect()
    }

    /// Fails when bytes are left over, which means the two sides disagree on the format.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "{} unexpected bytes after the message",
                self.rest.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let bytes = Encoder::new()
            .u8(7)
            .u32(70_000)
            .i64(-5)
            .duration(Duration::from_millis(1500))
            .str("key/α")
            .optional_bytes(None)
            .optional_bytes(Some(b"v"))
            .strings(&["a", "bc"])
            .finish();
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 70_000);
        assert_eq!(d.i64().unwrap(), -5);
        assert_eq!(d.duration().unwrap(), Duration::from_millis(1500));
        assert_eq!(d.string().unwrap(), "key/α");
        assert_eq!(d.optional_bytes().unwrap(), None);
        assert_eq!(d.optional_bytes().unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            d.strings().unwrap(),
            vec!["a".to_string(), "bc".to_string()]
        );
        d.finish().unwrap();
    }

    #[test]
    fn truncated_and_lying_messages_are_errors() {
        let bytes = Encoder::new().str("hello").finish();
        let err = Decoder::new(&bytes[..6]).string().unwrap_err();
        assert!(err.0.contains("ends early"), "{err}");

        let lying_count = Encoder::new().u32(1_000_000).finish();
        assert!(Decoder::new(&lying_count).strings().is_err());

        let extra = Encoder::new().u8(1).u8(2).finish();
        let mut d = Decoder::new(&extra);
        d.u8().unwrap();
        assert!(d.finish().is_err());
    }
}

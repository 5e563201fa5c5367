//! How span payloads are stored as members of a payload set.
//!
//! With compression on, a subsegment is one zstd frame of its payloads joined by `\0` (JSON
//! never contains a raw NUL), which cut Sentry's Redis time substantially; with compression
//! off (`level == -1`) each payload is its own member. The reader recognises a frame by the
//! zstd magic bytes, so both forms (and data written by Sentry's consumer) read back alike.

/// The first four bytes of every zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Separator between payloads inside one compressed member.
const SEPARATOR: u8 = 0;

/// Why a stored member could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("corrupt compressed payload batch")]
pub struct DecodeError(#[source] pub(crate) std::io::Error);

/// Encodes subsegments into set members, reusing one compressor (and its buffers).
pub struct PayloadEncoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    joined: Vec<u8>,
}

impl std::fmt::Debug for PayloadEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadEncoder")
            .field("compressed", &self.compressor.is_some())
            .finish_non_exhaustive()
    }
}

impl PayloadEncoder {
    /// An encoder for zstd `level` (0 = zstd's default), or raw members for `-1`.
    pub fn new(level: i32) -> std::io::Result<Self> {
        let compressor = if level == -1 {
            None
        } else {
            Some(zstd::bulk::Compressor::new(level)?)
        };
        Ok(Self {
            compressor,
            joined: Vec::new(),
        })
    }

    /// The members to `SADD` for these payloads.
    pub fn encode<'p>(
        &mut self,
        payloads: impl IntoIterator<Item = &'p [u8]>,
    ) -> std::io::Result<Vec<Vec<u8>>> {
        let Some(compressor) = self.compressor.as_mut() else {
            return Ok(payloads.into_iter().map(<[u8]>::to_vec).collect());
        };
        self.joined.clear();
        for (i, payload) in payloads.into_iter().enumerate() {
            if i > 0 {
                self.joined.push(SEPARATOR);
            }
            self.joined.extend_from_slice(payload);
        }
        Ok(vec![compressor.compress(&self.joined)?])
    }
}

/// Decodes set members back into payloads, reusing one zstd decompression context.
pub(super) struct PayloadDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for PayloadDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadDecoder").finish_non_exhaustive()
    }
}

impl PayloadDecoder {
    /// A decoder with a fresh decompression context.
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Self {
            decompressor: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Appends the payloads stored in one set member to `out`: the split frame when the member
    /// is zstd-compressed, else the member itself.
    pub(super) fn decode(
        &mut self,
        member: Vec<u8>,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), DecodeError> {
        if !member.starts_with(&ZSTD_MAGIC) {
            out.push(member);
            return Ok(());
        }
        // Frames written by either consumer record their size; others are streamed.
        let joined = match zstd::zstd_safe::get_frame_content_size(&member) {
            Ok(Some(size)) => self
                .decompressor
                .decompress(&member, usize::try_from(size).unwrap_or(usize::MAX))
                .map_err(DecodeError)?,
            _ => zstd::stream::decode_all(member.as_slice()).map_err(DecodeError)?,
        };
        let mut start = 0;
        for end in memchr::memchr_iter(SEPARATOR, &joined) {
            out.push(joined[start..end].to_vec());
            start = end + 1;
        }
        out.push(joined[start..].to_vec());
        Ok(())
    }
}

thread_local! {
    /// One decompression context per thread, made on first use.
    static DECODER: std::cell::RefCell<Option<PayloadDecoder>> = const { std::cell::RefCell::new(None) };
}

/// Appends the payloads stored in one set member to `out` (see [`PayloadDecoder::decode`]),
/// with the calling thread's decompression context.
pub(super) fn decode_member_into(
    member: Vec<u8>,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), DecodeError> {
    DECODER.with(|decoder| {
        let mut decoder = decoder.borrow_mut();
        let decoder = match decoder.as_mut() {
            Some(decoder) => decoder,
            None => decoder.insert(PayloadDecoder::new().map_err(DecodeError)?),
        };
        decoder.decode(member, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_member(member: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), DecodeError> {
        decode_member_into(member.to_vec(), out)
    }

    fn round_trip(level: i32) -> Vec<Vec<u8>> {
        let payloads: [&[u8]; 3] = [br#"{"span_id":"a"}"#, br#"{"span_id":"b"}"#, b"{}"];
        let mut encoder = PayloadEncoder::new(level).unwrap();
        let members = encoder.encode(payloads).unwrap();
        // Encode twice with the same encoder: the reused compressor gives the same bytes.
        assert_eq!(encoder.encode(payloads).unwrap(), members);
        let mut out = Vec::new();
        for member in &members {
            decode_member(member, &mut out).unwrap();
        }
        assert_eq!(out, payloads.map(<[u8]>::to_vec));
        members
    }

    #[test]
    fn compressed_payloads_are_one_zstd_frame_per_subsegment() {
        let members = round_trip(0);
        assert_eq!(members.len(), 1);
        assert!(members[0].starts_with(&ZSTD_MAGIC));
        assert_eq!(round_trip(3).len(), 1);
    }

    #[test]
    fn uncompressed_payloads_are_one_member_each() {
        assert_eq!(round_trip(-1).len(), 3);
    }

    #[test]
    fn a_corrupt_frame_is_an_error() {
        let mut out = Vec::new();
        assert!(decode_member(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], &mut out).is_err());
    }
}

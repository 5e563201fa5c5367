//! Byte sizes in the configuration: `10485760`, `"10MiB"`, `"1.5 MB"` all work.
//!
//! An operator thinks of `buffer.max_segment_bytes` in mebibytes, Sentry's option holds bytes:
//! both are accepted (parsed by `bytesize`, so `MiB` is 1024² and `MB` 1000²). A size is
//! written back exactly, in the largest binary unit that divides it (`"10MiB"`) or as a plain
//! integer, so `run --check` output loads back to the same number; `bytesize`'s own display
//! rounds (`"10.0 MiB"` for 10,485,761 bytes) and is therefore not used for writing.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Binary units, largest first, as written back.
const UNITS: [(&str, u64); 4] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
];

/// Parses `text` as a byte size: a plain integer, or a number and a unit (`"10MiB"`,
/// `"512 kB"`).
///
/// # Errors
///
/// What `bytesize` could not read.
pub fn parse(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
}

/// `bytes` as its exact text: `"10MiB"` when a binary unit divides it, else `None` (write the
/// integer).
pub fn exact_unit(bytes: u64) -> Option<String> {
    if bytes == 0 {
        return None;
    }
    UNITS
        .iter()
        .find(|(_, factor)| bytes.is_multiple_of(*factor))
        .map(|(unit, factor)| format!("{}{unit}", bytes / factor))
}

/// Serde `serialize_with`: the exact unit form, or an integer.
///
/// # Errors
///
/// The serializer's.
pub fn serialize<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    match exact_unit(*bytes) {
        Some(text) => serializer.serialize_str(&text),
        // TOML integers are signed: a size past i64::MAX is written as text.
        None if i64::try_from(*bytes).is_err() => serializer.serialize_str(&format!("{bytes}B")),
        None => serializer.serialize_u64(*bytes),
    }
}

/// Serde `deserialize_with`: an integer, or a string with a unit.
///
/// # Errors
///
/// A negative number, a fraction of a byte count written as a float, or text that is not a
/// size.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeVisitor)
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a byte count, or a size such as \"10MiB\"")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("{value} is negative")))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        parse(value).map_err(|reason| E::custom(format!("{value:?} is not a size: {reason}")))
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
    struct Holder {
        #[serde(with = "super")]
        size: u64,
    }

    fn read(text: &str) -> Result<u64, toml::de::Error> {
        toml::from_str::<Holder>(&format!("size = {text}")).map(|holder| holder.size)
    }

    #[test]
    fn sizes_are_read_as_integers_or_with_units() {
        assert_eq!(read("10485760").unwrap(), 10_485_760);
        assert_eq!(read("\"10MiB\"").unwrap(), 10_485_760);
        assert_eq!(read("\"10 MiB\"").unwrap(), 10_485_760);
        assert_eq!(read("\"10MB\"").unwrap(), 10_000_000);
        assert_eq!(read("\"1.5KiB\"").unwrap(), 1536);
        assert_eq!(read("\"0\"").unwrap(), 0);
        assert!(read("-1").unwrap_err().to_string().contains("negative"));
        assert!(
            read("\"ten megs\"")
                .unwrap_err()
                .to_string()
                .contains("size")
        );
    }

    #[test]
    fn sizes_are_written_exactly_and_read_back_the_same() {
        for (bytes, written) in [
            (10_485_760, "\"10MiB\""),
            (10_485_761, "10485761"),
            (1536, "1536"),
            (3072, "\"3KiB\""),
            (0, "0"),
            (u64::MAX, "\"18446744073709551615B\""),
        ] {
            let text = toml::to_string(&Holder { size: bytes }).unwrap();
            assert_eq!(text.trim(), format!("size = {written}"), "{bytes}");
            assert_eq!(toml::from_str::<Holder>(&text).unwrap().size, bytes);
        }
    }
}

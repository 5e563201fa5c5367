//! Redis replies turned back into values: errors found among a round trip's replies, arrays,
//! strings and numbers read leniently (RESP2 and RESP3 alike), and the add-buffer script's
//! records.

use redis::Value;

use super::write::PreparedSubsegment;
use crate::buffer::error::BufferError;
use crate::buffer::keys::SegmentKey;
use crate::buffer::segment::{InsertedSubsegment, ScriptSample};

/// The score of a `ZRANGE … WITHSCORES` reply's first entry; `None` when it is empty.
pub(crate) fn first_score(reply: Value) -> Result<Option<i64>, BufferError> {
    match into_array("ZRANGE", reply)?.get(1) {
        Some(score) => Ok(Some(as_f64(score)? as i64)),
        None => Ok(None),
    }
}

pub(super) fn is_error(value: &Value) -> bool {
    matches!(value, Value::ServerError(_))
}

pub(super) fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.code() == "NOSCRIPT")
}

pub(super) fn check_replies(command: &'static str, replies: &[Value]) -> Result<(), BufferError> {
    match replies.iter().find(|v| is_error(v)) {
        Some(error) => Err(BufferError::unexpected(command, error)),
        None => Ok(()),
    }
}

/// Errors inside the replies of spread commands (arrays of the replies of their parts).
pub(super) fn check_spread_replies(
    command: &'static str,
    replies: &[Value],
) -> Result<(), BufferError> {
    for reply in replies {
        if let Value::Array(parts) = reply {
            check_replies(command, parts)?;
        }
    }
    Ok(())
}

pub(crate) fn into_array(command: &'static str, value: Value) -> Result<Vec<Value>, BufferError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(BufferError::unexpected(command, &other)),
    }
}

pub(super) fn as_bytes(command: &'static str, value: Value) -> Result<Vec<u8>, BufferError> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        other => Err(BufferError::unexpected(command, &other)),
    }
}

pub(crate) fn as_string(command: &'static str, value: &Value) -> Result<String, BufferError> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes.clone()).map_err(|_| BufferError::unexpected(command, value))
        }
        Value::SimpleString(text) => Ok(text.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(BufferError::unexpected(command, other)),
    }
}

pub(crate) fn as_f64(value: &Value) -> Result<f64, BufferError> {
    match value {
        Value::Double(d) => Ok(*d),
        Value::Int(n) => Ok(*n as f64),
        other => as_string("score", other)?
            .parse()
            .map_err(|_| BufferError::unexpected("score", other)),
    }
}

pub(crate) fn as_optional_u64(value: Value) -> Result<Option<u64>, BufferError> {
    match value {
        Value::Nil => Ok(None),
        Value::Int(n) => Ok(Some(u64::try_from(n).unwrap_or(0))),
        other => as_string("GET", &other)?
            .parse::<i64>()
            .map(|n| Some(u64::try_from(n).unwrap_or(0)))
            .map_err(|_| BufferError::unexpected("GET", &other)),
    }
}

pub(crate) fn as_i64(value: &Value) -> Result<i64, BufferError> {
    match value {
        Value::Int(n) => Ok(*n),
        other => as_string("EVALSHA", other)?
            .parse()
            .map_err(|_| BufferError::unexpected("EVALSHA", other)),
    }
}

pub(super) fn flat_pairs(value: Value) -> Result<Vec<(String, i64)>, BufferError> {
    into_array("EVALSHA", value)?
        .chunks(2)
        .map(|pair| {
            let name = as_string("EVALSHA", &pair[0])?;
            let value = pair.get(1).map_or(Ok(0), as_i64)?;
            Ok((name, value))
        })
        .collect()
}

/// Maps one record of the script's reply `{segment_key, has_root_span, latency_us,
/// latencies, metrics, merged_segment_span_ids}`.
pub(super) fn parse_inserted(
    subsegment: &PreparedSubsegment,
    fields: &[Value],
) -> Result<InsertedSubsegment, BufferError> {
    let mut items = fields.iter().cloned();
    let mut next = || items.next().unwrap_or(Value::Nil);
    let key = as_string("EVALSHA", &next())?;
    let segment_key = SegmentKey::parse(key.clone()).ok_or(BufferError::UnexpectedReply {
        command: "EVALSHA",
        reply: key,
    })?;
    let has_root_span = matches!(next(), Value::Int(1));
    let latency_us = match next() {
        Value::Nil => -1,
        value => as_i64(&value)?,
    };
    let latencies = flat_pairs(next())?;
    let metrics = flat_pairs(next())?;
    let merged_segment_span_ids = into_array("EVALSHA", next())?
        .iter()
        .map(|id| as_string("EVALSHA", id))
        .collect::<Result<_, _>>()?;
    let sampled = (latency_us >= 0 || !metrics.is_empty()).then(|| ScriptSample {
        latency_us: u64::try_from(latency_us).unwrap_or(0),
        latencies,
        metrics,
    });
    Ok(InsertedSubsegment {
        segment_key,
        has_root_span,
        salt: subsegment.salt.clone(),
        partition: subsegment.partition,
        merged_segment_span_ids,
        sampled,
    })
}

/// The number `name` of an `INFO` reply's text; 0 when it is missing.
pub(crate) fn info_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{span, subsegment};
    use super::*;

    #[test]
    fn ingest_metadata_maps_counters_or_their_absence() {
        assert_eq!(
            as_optional_u64(Value::BulkString(b"3".to_vec())).unwrap(),
            Some(3)
        );
        assert_eq!(
            as_optional_u64(Value::BulkString(b"42".to_vec())).unwrap(),
            Some(42)
        );
        assert_eq!(as_optional_u64(Value::Nil).unwrap(), None);
        assert!(as_optional_u64(Value::BulkString(b"x".to_vec())).is_err());
    }

    #[test]
    fn maps_a_script_record_into_an_inserted_subsegment() {
        let spans = [span("t", "a")];
        let subsegment = subsegment(&spans, "salt");
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let sampled = [
            bulk("span-buf:s:{1:t}:root"),
            Value::Int(1),
            Value::Int(12),
            Value::Array(vec![bulk("total_step_latency_us"), Value::Int(12)]),
            Value::Array(vec![bulk("redirect_depth"), Value::Int(2)]),
            Value::Array(vec![bulk("child")]),
        ];
        let inserted = parse_inserted(&PreparedSubsegment::of(&subsegment), &sampled).unwrap();
        assert_eq!(inserted.segment_key.as_str(), "span-buf:s:{1:t}:root");
        assert!(inserted.has_root_span);
        assert_eq!(inserted.partition, 3);
        assert_eq!(inserted.merged_segment_span_ids, ["child"]);
        let sample = inserted.sampled.unwrap();
        assert_eq!(sample.latency_us, 12);
        assert_eq!(sample.metric("redirect_depth"), Some(2));

        let unsampled = [
            bulk("span-buf:s:{1:t}:salt"),
            Value::Nil,
            Value::Int(-1),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Array(vec![]),
        ];
        let inserted = parse_inserted(&PreparedSubsegment::of(&subsegment), &unsampled).unwrap();
        assert!(!inserted.has_root_span);
        assert!(inserted.is_detached());
        assert!(inserted.sampled.is_none());
        assert!(
            parse_inserted(&PreparedSubsegment::of(&subsegment), &[bulk("not a key")]).is_err()
        );
    }
}

//! The codec of every generated client and server: prost's encoding, with one difference. Bytes
//! that do not decode as the expected message are INVALID_ARGUMENT (reason `MALFORMED_MESSAGE`,
//! the field being decoded as a violation), not tonic's INTERNAL: a malformed request is the
//! caller's input, and INTERNAL is kept for broken invariants of the server.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// prost's codec, with [`MessageDecoder`] as its decoder.
#[derive(Debug)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// Decodes a `U`; bytes that are not one are INVALID_ARGUMENT.
#[derive(Debug)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| malformed(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// INVALID_ARGUMENT for a message that did not decode.
fn malformed(error: &prost::DecodeError) -> Status {
    let (field, description) = split(&error.to_string());
    let mut details = ErrorDetails::with_error_info(
        "MALFORMED_MESSAGE",
        "meshflow",
        std::collections::HashMap::new(),
    );
    if !field.is_empty() {
        details.add_bad_request_violation(field.clone(), description.clone());
    }
    let message = if field.is_empty() {
        format!("malformed message: {description}")
    } else {
        format!("malformed message: {field}: {description}")
    };
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// Splits prost's rendering of a decode error, `failed to decode Protobuf message: Inner.field:
/// Outer.field: description` (the innermost field first), into the path of the field being decoded
/// (`outer_field.inner_field`, empty at the top level) and the description.
fn split(rendered: &str) -> (String, String) {
    let rest = rendered
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(rendered);
    let mut path = Vec::new();
    let mut rest = rest;
    while let Some((segment, after)) = rest.split_once(": ") {
        match segment.split_once('.') {
            Some((message, field))
                if !message.is_empty()
                    && !field.is_empty()
                    && !segment.contains(' ')
                    && !field.contains('.') =>
            {
                path.push(field);
                rest = after;
            }
            _ => break,
        }
    }
    path.reverse();
    (path.join("."), rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::v1::StartExecutionRequest;
    use crate::workflow::v1::CreateWorkflowRequest;

    fn decode<U: Message + Default + std::fmt::Debug>(bytes: &[u8]) -> Status {
        malformed(&U::decode(bytes).expect_err("malformed"))
    }

    fn violations(status: &Status) -> Vec<(String, String)> {
        status
            .get_details_bad_request()
            .map(|b| {
                b.field_violations
                    .into_iter()
                    .map(|v| (v.field, v.description))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_malformed_message_is_invalid_argument_naming_the_field() {
        // workflow_id (field 1) claims 5 bytes and has 2.
        let status = decode::<StartExecutionRequest>(b"\x0a\x05ab");
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("MALFORMED_MESSAGE", "meshflow")
        );
        assert_eq!(
            violations(&status),
            [("workflow_id".to_string(), "buffer underflow".to_string())]
        );
        // A string that is not UTF-8, inside a nested message: workflow (1) → name (2).
        let status = decode::<CreateWorkflowRequest>(b"\x0a\x04\x12\x02\xc3\x28");
        let found = violations(&status);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "workflow.name");
        assert!(
            status
                .message()
                .starts_with("malformed message: workflow.name: ")
        );
    }

    #[test]
    fn an_error_outside_any_field_has_no_violation() {
        let status = decode::<StartExecutionRequest>(b"\xff\xff\xff");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(violations(&status).is_empty());
        assert_eq!(status.message(), "malformed message: invalid varint");
    }

    #[test]
    fn the_rendering_splits_into_path_and_description() {
        assert_eq!(
            split("failed to decode Protobuf message: A.b: C.d: invalid wire type: x (expected y)"),
            (
                "d.b".to_string(),
                "invalid wire type: x (expected y)".to_string()
            )
        );
        assert_eq!(
            split("failed to decode Protobuf message: buffer underflow"),
            (String::new(), "buffer underflow".to_string())
        );
    }
}

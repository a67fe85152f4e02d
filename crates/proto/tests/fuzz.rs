//! Property test of client-frame parsing (issue 14): whatever a client sends — arbitrary bytes,
//! arbitrary text, JSON of the right shape with wrong values — `ClientFrame::parse` never
//! panics, and every refusal carries a frame error code and, when the JSON was readable, names
//! the field at fault. Bounded: PROPTEST_CASES (default 2000 per property, well under a second
//! or two each).

use natter_proto::{ClientFrame, ErrorCode};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn config() -> ProptestConfig {
    ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() }
}

/// Any JSON value, a few levels deep, with strings drawn from all of Unicode (NUL included).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Floats that JSON text carries exactly (serde_json's default parser may move the last
        // digit of some long ones, which would fail the round trip for the wrong reason).
        any::<i32>().prop_map(|i| Value::from(f64::from(i) / 8.0)),
        any::<String>().prop_map(Value::String),
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object shaped like a client frame: a type (known or not), the fields of every frame type
/// (each present or not, with any value), and sometimes a field of its own.
fn frame_like() -> impl Strategy<Value = Value> {
    let ty = prop_oneof![
        Just(json!("message")),
        Just(json!("ping")),
        Just(json!("cancel")),
        any::<String>().prop_map(Value::String),
        json_value(),
    ];
    let field = |name: &'static str| (Just(name), prop::option::of(json_value()));
    (
        prop::option::of(ty),
        field("client_id"),
        field("content"),
        field("message_id"),
        field("id"),
        prop::option::of((any::<String>(), json_value())),
    )
        .prop_map(|(ty, a, b, c, d, extra)| {
            let mut m = Map::new();
            if let Some(t) = ty {
                m.insert("type".into(), t);
            }
            for (k, v) in [a, b, c, d] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

use serde_json::json;

/// What every refusal must satisfy.
fn check(text: &str) -> Result<(), TestCaseError> {
    let Err(e) = ClientFrame::parse(text) else { return Ok(()) };
    prop_assert!(!e.message.is_empty());
    match e.code {
        ErrorCode::InvalidJson => {}
        ErrorCode::UnknownType => prop_assert!(e.message.starts_with("unknown frame type"), "{}", e.message),
        ErrorCode::InvalidFrame => {
            // A field in backquotes: `type`, `client_id`, ... or the unknown one.
            let named = e.message.contains("\"type\" field")
                || e.message.starts_with("unknown field `")
                || ["`type`", "`client_id`", "`content`", "`message_id`", "`id`"].iter().any(|f| e.message.contains(f));
            prop_assert!(named, "no field named in {:?} for {}", e.message, text);
        }
        other => prop_assert!(false, "unexpected code {:?} for {}", other, text),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn arbitrary_json_is_refused_naming_what_is_wrong(v in json_value()) {
        check(&v.to_string())?;
    }

    #[test]
    fn frame_shaped_json_is_parsed_or_refused_naming_the_field(v in frame_like()) {
        let text = v.to_string();
        check(&text)?;
        // Whatever parses round-trips: the server acts on exactly what was sent.
        if let Ok(frame) = ClientFrame::parse(&text) {
            let again = ClientFrame::parse(&serde_json::to_string(&frame).unwrap()).unwrap();
            prop_assert_eq!(again, frame);
        }
    }
}

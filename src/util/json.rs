//! JSON documents read so that a value of the wrong type names its field.
//!
//! serde_json alone says "invalid type: string \"127\", expected usize at line 5 column 20";
//! in a manifest of 300 shards that leaves the user counting lines. Through
//! `serde_path_to_error` the message starts with the field's path (`shards[2].rows`).

use serde::de::DeserializeOwned;

/// `text` as a `T`, or an error message that names the offending field where there is one.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// `value` as a `T`, with the same messages as [`from_str`] (less the line and column).
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(describe)
}

fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    match path.as_str() {
        // "?": serde_path_to_error knows no position (a document cut short).
        "" | "." | "?" => e.into_inner().to_string(),
        _ => format!("field {path}: {}", e.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Shard {
        file: String,
        rows: usize,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Doc {
        shards: Vec<Shard>,
    }

    #[test]
    fn wrong_types_name_their_field() {
        let text = r#"{"shards": [{"file": "a.npy", "rows": 3}, {"file": "b.npy", "rows": "127"}]}"#;
        let e = from_str::<Doc>(text).unwrap_err();
        assert!(e.starts_with("field shards[1].rows: invalid type: string \"127\""), "{e}");
        assert!(e.contains("line 1 column"), "{e}");
        let e = from_value::<Doc>(serde_json::json!({"shards": [{"file": 1, "rows": 2}]})).unwrap_err();
        assert!(e.starts_with("field shards[0].file: invalid type: integer"), "{e}");
        let e = from_str::<Doc>("{\"shards\": []} x").unwrap_err();
        assert!(e.contains("trailing characters"), "{e}");
        // A document of the wrong kind has no field to name.
        let e = from_str::<Doc>("\"x\"").unwrap_err();
        assert!(!e.starts_with("field"), "{e}");
        assert!(from_str::<Doc>(r#"{"shards": [{"file": "a", "rows": 1}]}"#).is_ok());
    }
}

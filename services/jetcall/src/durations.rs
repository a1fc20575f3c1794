//! Human-readable durations (`"500ms"`, `"5m"`) for lists, which `humantime_serde` does not
//! cover, and a `std` duration as a `time` one for arithmetic on timestamps.

/// `duration` as a `time::Duration`, saturating: a configured duration too long to add to a
/// timestamp means "for ever", never a panic.
pub fn to_time(duration: std::time::Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
}

/// `#[serde(with = "crate::durations::list")]` for a `Vec<Duration>`.
pub mod list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(
        durations: &[Duration],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(durations.len()))?;
        for duration in durations {
            seq.serialize_element(&humantime::format_duration(*duration).to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                humantime::parse_duration(text)
                    .map_err(|err| D::Error::custom(format!("`{text}` is not a duration: {err}")))
            })
            .collect()
    }
}

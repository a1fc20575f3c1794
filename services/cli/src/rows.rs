//! Jobs read from a file, one row at a time: JSONL (a `POST /api/v1/jobs` body per line), JSON
//! (an array of them) or CSV (a header row, then one job per record). Each row remembers where
//! it came from, so a rejection can name its line.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The columns of a CSV file that are fields of the job itself; every other column is a
/// field of its `input`.
const JOB_COLUMNS: [&str; 3] = ["job_id", "kind", "callback_url"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Json,
    Csv,
}

impl Format {
    /// The format a file's extension names: `.jsonl`/`.ndjson`, `.json` or `.csv`.
    pub fn of_path(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "json" => Some(Self::Json),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Shape { path: PathBuf, message: String },
    #[error("cannot tell the format of {0}: name it with --format jsonl|json|csv")]
    UnknownFormat(PathBuf),
}

/// Where a row came from: a line of a JSONL or CSV file, or an item of a JSON array
/// (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    Line(u64),
    Item(usize),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(line) => write!(f, "line {line}"),
            Self::Item(item) => write!(f, "item {item}"),
        }
    }
}

/// A row that could not be made into a job body, so it is never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// `malformed_json` or `invalid_row`, in the manner of the gateway's error types.
    pub kind: &'static str,
    pub message: String,
}

#[derive(Debug)]
pub struct Row {
    pub place: Place,
    pub job: Result<Value, RowError>,
}

/// What the command line gives every row that leaves it out.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub kind: Option<String>,
    pub callback_url: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    /// For rows that give neither `ttl` nor `expires_at`.
    pub ttl: Option<String>,
    pub priority: Option<String>,
}

impl Defaults {
    fn fill(&self, job: &mut Value) {
        let Value::Object(job) = job else { return };
        let fields = [
            ("kind", self.kind.clone().map(Value::String)),
            ("callback_url", self.callback_url.clone().map(Value::String)),
            ("metadata", self.metadata.clone().map(Value::Object)),
            ("priority", self.priority.clone().map(Value::String)),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                job.entry(name).or_insert(value);
            }
        }
        if let Some(ttl) = &self.ttl
            && !job.contains_key("ttl")
            && !job.contains_key("expires_at")
        {
            job.insert("ttl".into(), Value::String(ttl.clone()));
        }
    }
}

/// A file's rows, read lazily, and how many there are (for the progress bar).
pub struct Rows {
    pub total: u64,
    pub iter: Box<dyn Iterator<Item = Row> + Send>,
}

impl fmt::Debug for Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rows").field("total", &self.total).finish()
    }
}

/// Opens `path` as `format` (or the format its extension names).
pub fn open(path: &Path, format: Option<Format>, defaults: Defaults) -> Result<Rows, ReadError> {
    let format = format
        .or_else(|| Format::of_path(path))
        .ok_or_else(|| ReadError::UnknownFormat(path.to_owned()))?;
    match format {
        Format::Jsonl => jsonl(path, defaults),
        Format::Json => json(path, defaults),
        Format::Csv => csv(path, defaults),
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> ReadError + '_ {
    move |err| ReadError::Io {
        path: path.to_owned(),
        message: err.to_string(),
    }
}

fn jsonl(path: &Path, defaults: Defaults) -> Result<Rows, ReadError> {
    let open = || File::open(path).map(BufReader::new).map_err(io_error(path));
    let mut total = 0;
    for line in open()?.split(b'\n') {
        if !line.map_err(io_error(path))?.trim_ascii().is_empty() {
            total += 1;
        }
    }
    let iter = open()?
        .lines()
        .zip(1u64..)
        .filter(|(line, _)| line.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(move |(line, number)| {
            let job = line
                .map_err(|err| RowError {
                    kind: "invalid_row",
                    message: err.to_string(),
                })
                .and_then(|line| {
                    serde_json::from_str::<Value>(&line).map_err(|err| RowError {
                        kind: "malformed_json",
                        message: format!("not a JSON value: {err}"),
                    })
                })
                .map(|mut job| {
                    defaults.fill(&mut job);
                    job
                });
            Row {
                place: Place::Line(number),
                job,
            }
        });
    Ok(Rows {
        total,
        iter: Box::new(iter),
    })
}

fn json(path: &Path, defaults: Defaults) -> Result<Rows, ReadError> {
    let file = File::open(path).map_err(io_error(path))?;
    let value: Value =
        serde_json::from_reader(BufReader::new(file)).map_err(|err| ReadError::Shape {
            path: path.to_owned(),
            message: format!("not JSON: {err}"),
        })?;
    // An array of jobs, or a batch body `{"jobs": [...]}`.
    let jobs = match value {
        Value::Array(jobs) => jobs,
        Value::Object(mut body)
            if body.len() == 1 && body.get("jobs").is_some_and(Value::is_array) =>
        {
            match body.remove("jobs") {
                Some(Value::Array(jobs)) => jobs,
                _ => Vec::new(),
            }
        }
        _ => {
            return Err(ReadError::Shape {
                path: path.to_owned(),
                message: "a .json file holds an array of jobs (or `{\"jobs\": [...]}`)".into(),
            });
        }
    };
    let total = jobs.len() as u64;
    let iter = jobs.into_iter().zip(1usize..).map(move |(mut job, item)| {
        defaults.fill(&mut job);
        Row {
            place: Place::Item(item),
            job: Ok(job),
        }
    });
    Ok(Rows {
        total,
        iter: Box::new(iter),
    })
}

fn csv_reader(path: &Path) -> Result<csv::Reader<File>, ReadError> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_path(path)
        .map_err(|err| ReadError::Io {
            path: path.to_owned(),
            message: err.to_string(),
        })
}

fn csv(path: &Path, defaults: Defaults) -> Result<Rows, ReadError> {
    let mut counting = csv_reader(path)?;
    let mut total = 0;
    let mut record = csv::ByteRecord::new();
    loop {
        match counting.read_byte_record(&mut record) {
            Ok(true) => total += 1,
            Ok(false) => break,
            Err(err) if err.is_io_error() => {
                return Err(ReadError::Io {
                    path: path.to_owned(),
                    message: err.to_string(),
                });
            }
            // A record that does not parse is still a row, rejected with its line.
            Err(_) => total += 1,
        }
    }

    let mut reader = csv_reader(path)?;
    let headers = reader.headers().map_err(|err| ReadError::Shape {
        path: path.to_owned(),
        message: format!("cannot read the header row: {err}"),
    })?;
    let headers: Vec<String> = headers.iter().map(str::to_owned).collect();
    if headers.iter().all(String::is_empty) {
        return Err(ReadError::Shape {
            path: path.to_owned(),
            message: "the first row must name the columns".into(),
        });
    }
    let mut done = false;
    let iter = reader.into_records().map_while(move |record| {
        if done {
            return None;
        }
        let row = match record {
            Ok(record) => Row {
                place: Place::Line(record.position().map_or(0, csv::Position::line)),
                job: Ok(csv_job(&headers, &record, &defaults)),
            },
            Err(err) => {
                // An I/O error ends the file; anything else is this record's fault alone.
                done = err.is_io_error();
                Row {
                    place: Place::Line(err.position().map_or(0, csv::Position::line)),
                    job: Err(RowError {
                        kind: "invalid_row",
                        message: csv_message(&err),
                    }),
                }
            }
        };
        Some(row)
    });
    Ok(Rows {
        total,
        iter: Box::new(iter),
    })
}

/// A record as a job body: `job_id`, `kind` and `callback_url` columns are the job's own,
/// every other column is an input field. An empty cell counts as absent.
fn csv_job(headers: &[String], record: &csv::StringRecord, defaults: &Defaults) -> Value {
    let mut job = Map::new();
    let mut input = Map::new();
    for (name, value) in headers.iter().zip(record.iter()) {
        if value.is_empty() || name.is_empty() {
            continue;
        }
        let target = if JOB_COLUMNS.contains(&name.as_str()) {
            &mut job
        } else {
            &mut input
        };
        target.insert(name.clone(), Value::String(value.to_owned()));
    }
    job.insert("input".into(), Value::Object(input));
    let mut job = Value::Object(job);
    defaults.fill(&mut job);
    job
}

fn csv_message(err: &csv::Error) -> String {
    match err.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("has {len} fields where the header row has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8".into(),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::json;

    use super::*;

    fn file(extension: &str, text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(extension)
            .tempfile()
            .expect("temporary file");
        file.write_all(text.as_bytes()).expect("write");
        file
    }

    fn read(file: &tempfile::NamedTempFile, defaults: Defaults) -> (u64, Vec<Row>) {
        let rows = open(file.path(), None, defaults).expect("open");
        (rows.total, rows.iter.collect())
    }

    fn defaults() -> Defaults {
        Defaults {
            kind: Some("product-description".into()),
            callback_url: Some("http://127.0.0.1:9/hook".into()),
            metadata: None,
            ttl: None,
            priority: None,
        }
    }

    #[test]
    fn csv_columns_become_job_and_input_fields_with_their_line_numbers() {
        let csv = file(
            ".csv",
            "job_id, product_id ,product_name,callback_url\n\
             J-1,P-1,\"An AC, quiet\",\n\
             J-2,P-2,\"Two\nlines\",http://127.0.0.1:7/other\n\
             J-3,P-3\n\
             ,P-4,Fan,\n",
        );
        let (total, rows) = read(&csv, defaults());
        assert_eq!(total, 4);
        let places: Vec<Place> = rows.iter().map(|row| row.place).collect();
        assert_eq!(
            places,
            [
                Place::Line(2),
                Place::Line(3),
                Place::Line(5),
                Place::Line(6)
            ]
        );
        assert_eq!(
            rows[0].job.as_ref().ok(),
            Some(&json!({
                "job_id": "J-1",
                "kind": "product-description",
                "callback_url": "http://127.0.0.1:9/hook",
                "input": {"product_id": "P-1", "product_name": "An AC, quiet"}
            }))
        );
        assert_eq!(
            rows[1]
                .job
                .as_ref()
                .ok()
                .and_then(|job| job.get("callback_url")),
            Some(&json!("http://127.0.0.1:7/other"))
        );
        let short = rows[2].job.as_ref().expect_err("a short record");
        assert_eq!(short.kind, "invalid_row");
        assert!(
            short
                .message
                .contains("has 2 fields where the header row has 4")
        );
        assert_eq!(
            rows[3].job.as_ref().ok().and_then(|job| job.get("job_id")),
            None,
            "an empty cell is absent"
        );
    }

    #[test]
    fn jsonl_skips_blank_lines_but_counts_them_in_line_numbers() {
        let jsonl = file(
            ".jsonl",
            "{\"job_id\": \"J-1\", \"input\": {}}\n\n{not json\n{\"kind\": \"haiku\"}\n",
        );
        let (total, rows) = read(&jsonl, defaults());
        assert_eq!(total, 3);
        assert_eq!(rows[0].place, Place::Line(1));
        assert_eq!(
            rows[0].job.as_ref().ok().and_then(|job| job.get("kind")),
            Some(&json!("product-description"))
        );
        assert_eq!(rows[1].place, Place::Line(3));
        assert_eq!(
            rows[1].job.as_ref().map_err(|err| err.kind),
            Err("malformed_json")
        );
        assert_eq!(
            rows[2].job.as_ref().ok().and_then(|job| job.get("kind")),
            Some(&json!("haiku")),
            "a row's own kind wins over --kind"
        );
    }

    #[test]
    fn a_default_ttl_fills_only_rows_without_an_expiry_of_their_own() {
        let jsonl = file(
            ".jsonl",
            "{\"job_id\": \"J-1\"}\n{\"job_id\": \"J-2\", \"ttl\": \"5m\"}\n\
             {\"job_id\": \"J-3\", \"expires_at\": \"2030-01-01T00:00:00Z\"}\n",
        );
        let defaults = Defaults {
            ttl: Some("2h".into()),
            ..defaults()
        };
        let (_, rows) = read(&jsonl, defaults);
        let ttl = |n: usize| {
            rows[n]
                .job
                .as_ref()
                .ok()
                .and_then(|job| job.get("ttl"))
                .cloned()
        };
        assert_eq!(ttl(0), Some(json!("2h")));
        assert_eq!(ttl(1), Some(json!("5m")), "a row's own ttl wins");
        assert_eq!(ttl(2), None, "a row with expires_at gets no ttl beside it");
    }

    #[test]
    fn json_takes_an_array_or_a_batch_body() {
        let array = file(".json", "[{\"job_id\": \"J-1\"}, {\"job_id\": \"J-2\"}]");
        let (total, rows) = read(&array, Defaults::default());
        assert_eq!(total, 2);
        assert_eq!(rows[1].place, Place::Item(2));
        let batch = file(".json", "{\"jobs\": [{\"job_id\": \"J-1\"}]}");
        assert_eq!(read(&batch, Defaults::default()).0, 1);
        let neither = file(".json", "{\"job_id\": \"J-1\"}");
        assert!(matches!(
            open(neither.path(), None, Defaults::default()),
            Err(ReadError::Shape { .. })
        ));
    }

    #[test]
    fn the_format_comes_from_the_extension_or_the_flag() {
        let text = file(".txt", "{}\n");
        assert!(matches!(
            open(text.path(), None, Defaults::default()),
            Err(ReadError::UnknownFormat(_))
        ));
        assert!(open(text.path(), Some(Format::Jsonl), Defaults::default()).is_ok());
        assert_eq!(Format::of_path(Path::new("a.NDJSON")), Some(Format::Jsonl));
    }
}

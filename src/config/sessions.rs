//! The `[sessions]` table of the config: which table holds the sessions, its
//! columns, and its vocabulary of states. Validated here, without I/O; the
//! store checks it against the database's catalog when it connects.
//!
//! Identifiers are validated (`^[A-Za-z_][A-Za-z0-9_]{0,62}$` per part) and
//! always emitted double-quoted; state values are only ever bound parameters.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::RowState;

/// A validated SQL identifier, emitted double-quoted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    /// Validates one identifier. The rule is stricter than PostgreSQL's, so
    /// every accepted name means the same quoted or not.
    pub fn parse(s: &str) -> Result<Ident, String> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || s.len() > 63 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "{s:?} is not a plain identifier: use letters, digits and _, starting with a letter or _, at most 63"
            ));
        }
        Ok(Ident(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier double-quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Ident {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A table name, optionally schema-qualified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<Ident>,
    pub name: Ident,
}

impl TableName {
    pub fn parse(s: &str) -> Result<TableName, String> {
        match s.split_once('.') {
            Some((schema, name)) => Ok(TableName { schema: Some(Ident::parse(schema)?), name: Ident::parse(name)? }),
            None => Ok(TableName { schema: None, name: Ident::parse(s)? }),
        }
    }

    /// `"schema"."name"`, or `"name"` (found through the search path).
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", s.quoted(), self.name.quoted()),
            None => self.name.quoted(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

impl Serialize for TableName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The columns sessiond reads and writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Columns {
    pub id: Ident,
    pub state: Ident,
    pub created_at: Ident,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Ident>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Ident>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Ident>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Ident>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<Ident>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Ident>,
    /// More timestamps that say the row changed (the reference table's
    /// `deleted_at`); read only.
    #[serde(skip)]
    pub also_changed: Vec<Ident>,
}

impl Columns {
    /// The reference table's columns.
    pub fn reference() -> Columns {
        let i = |s: &str| Ident(s.to_owned());
        Columns {
            id: i("session_id"),
            state: i("state"),
            created_at: i("created_at"),
            owner: Some(i("owner_id")),
            instance: Some(i("controller_instance")),
            updated_at: Some(i("updated_at")),
            ended_at: Some(i("ended_at")),
            end_reason: Some(i("end_reason")),
            deleted: None,
            also_changed: vec![i("deleted_at")],
        }
    }

    /// Every mapped column, with its key in the config, for messages.
    pub fn all(&self) -> Vec<(&'static str, &Ident)> {
        let mut v = vec![("id", &self.id), ("state", &self.state), ("created_at", &self.created_at)];
        for (k, c) in [
            ("owner", &self.owner),
            ("instance", &self.instance),
            ("updated_at", &self.updated_at),
            ("ended_at", &self.ended_at),
            ("end_reason", &self.end_reason),
            ("deleted", &self.deleted),
        ] {
            if let Some(c) = c {
                v.push((k, c));
            }
        }
        v
    }
}

/// The table's values for each canonical state. The first value of a state is
/// the one sessiond writes; any of them reads as that state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocabulary {
    values: [Vec<String>; 6],
}

impl Vocabulary {
    /// The reference table's vocabulary: each state is its own name.
    pub fn reference() -> Vocabulary {
        Vocabulary { values: RowState::ALL.map(|s| vec![s.as_str().to_owned()]) }
    }

    fn index(state: RowState) -> usize {
        RowState::ALL.iter().position(|s| *s == state).unwrap_or(0)
    }

    /// The values that read as `state`.
    pub fn values(&self, state: RowState) -> &[String] {
        &self.values[Self::index(state)]
    }

    /// The value written for `state`, if the table has one.
    pub fn written(&self, state: RowState) -> Option<&str> {
        self.values(state).first().map(String::as_str)
    }

    /// The canonical state of a table value.
    pub fn read(&self, value: &str) -> Option<RowState> {
        RowState::ALL.into_iter().find(|s| self.values(*s).iter().any(|v| v == value))
    }

    /// Every value that reads as a live state.
    pub fn live_values(&self) -> Vec<&str> {
        RowState::ALL.iter().filter(|s| s.is_live()).flat_map(|s| self.values(*s)).map(String::as_str).collect()
    }

    /// Every value the vocabulary knows.
    pub fn all_values(&self) -> Vec<&str> {
        self.values.iter().flatten().map(String::as_str).collect()
    }
}

impl Serialize for Vocabulary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(6))?;
        for state in RowState::ALL {
            m.serialize_entry(state.as_str(), self.values(state))?;
        }
        m.end()
    }
}

/// `[sessions.columns]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColumns {
    pub id: Option<String>,
    pub state: Option<String>,
    pub created_at: Option<String>,
    pub owner: Option<String>,
    pub instance: Option<String>,
    pub updated_at: Option<String>,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    pub deleted: Option<String>,
}

/// `[sessions.states]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStates {
    pub creating: Option<Vec<String>>,
    pub active: Option<Vec<String>>,
    pub paused: Option<Vec<String>>,
    pub stopped: Option<Vec<String>>,
    pub failed: Option<Vec<String>>,
    pub deleted: Option<Vec<String>>,
}

/// Validates `[sessions.columns]` (errors are `(key, problem)`).
pub fn columns(raw: RawColumns) -> Result<Columns, (String, String)> {
    let one = |key: &str, v: Option<String>| -> Result<Option<Ident>, (String, String)> {
        v.map(|s| Ident::parse(&s).map_err(|p| (format!("sessions.columns.{key}"), p))).transpose()
    };
    let required = |key: &str, v: Option<String>| -> Result<Ident, (String, String)> {
        one(key, v)?.ok_or_else(|| {
            (format!("sessions.columns.{key}"), "is required with sessions.table: name the column that holds it".into())
        })
    };
    let c = Columns {
        id: required("id", raw.id)?,
        state: required("state", raw.state)?,
        created_at: required("created_at", raw.created_at)?,
        owner: one("owner", raw.owner)?,
        instance: one("instance", raw.instance)?,
        updated_at: one("updated_at", raw.updated_at)?,
        ended_at: one("ended_at", raw.ended_at)?,
        end_reason: one("end_reason", raw.end_reason)?,
        deleted: one("deleted", raw.deleted)?,
        also_changed: Vec::new(),
    };
    let all = c.all();
    for (i, (k, col)) in all.iter().enumerate() {
        if let Some((other, _)) = all[..i].iter().find(|(_, c)| c == col) {
            return Err((format!("sessions.columns.{k}"), format!("column {col} is also mapped as {other}")));
        }
    }
    Ok(c)
}

/// Validates `[sessions.states]`. A state left out keeps its own name as its
/// only value; `[]` means the table has no such state.
pub fn states(raw: RawStates) -> Result<Vocabulary, (String, String)> {
    let given = [raw.creating, raw.active, raw.paused, raw.stopped, raw.failed, raw.deleted];
    let mut values: [Vec<String>; 6] = Default::default();
    for (i, (state, v)) in RowState::ALL.into_iter().zip(given).enumerate() {
        let key = format!("sessions.states.{}", state.as_str());
        let v = v.unwrap_or_else(|| vec![state.as_str().to_owned()]);
        for value in &v {
            if value.is_empty() || value.len() > 255 || value.chars().any(char::is_control) {
                return Err((key, format!("{value:?} is not a usable state value (1 to 255 printable characters)")));
            }
            if let Some(other) = values[..i].iter().position(|vs| vs.contains(value)) {
                return Err((key, format!("{value:?} is also listed under {}", RowState::ALL[other].as_str())));
            }
        }
        values[i] = v;
    }
    Ok(Vocabulary { values })
}

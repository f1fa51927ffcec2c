//! Values across the boundary: a guest's parameters as the types the
//! server declared, and columns as the guest's values.
//!
//! Invariant: values are the guest's data and are never logged (a
//! parameter's `Debug` prints no value).

use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use crate::sandbox::bindings::v0_2::wasmq::task0_1_0::types::HostError;
use crate::sandbox::bindings::v0_2::wasmq::task0_2_0::postgres::Value;

/// A guest value as a statement parameter, converted to the type the
/// server says the parameter has.
pub(super) struct Param<'a>(pub(super) &'a Value);

impl std::fmt::Debug for Param<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Param") // values are the guest's data: not logged
    }
}

type SqlResult = Result<IsNull, Box<dyn std::error::Error + Sync + Send>>;

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> SqlResult {
        let mismatch = |what: &str| -> SqlResult {
            Err(format!("a {what} parameter cannot be passed as {ty}").into())
        };
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Boolean(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            Value::Int64(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT8 => i.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => mismatch("int64"),
            },
            Value::Float64(x) => match *ty {
                Type::FLOAT4 => (*x as f32).to_sql(ty, out),
                Type::FLOAT8 => x.to_sql(ty, out),
                _ => mismatch("float64"),
            },
            Value::Text(s) if <&str as ToSql>::accepts(ty) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            Value::Json(s) if *ty == Type::JSON || *ty == Type::JSONB => {
                serde_json::from_str::<serde_json::Value>(s)?.to_sql(ty, out)
            }
            Value::Boolean(_) => mismatch("boolean"),
            Value::Text(_) => mismatch("text"),
            Value::Bytes(_) => mismatch("bytes"),
            Value::Json(_) => mismatch("json"),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A column value for the guest.
pub(super) fn column(row: &tokio_postgres::Row, i: usize) -> Result<Value, HostError> {
    let ty = row.columns()[i].type_().clone();
    let bad = |e: tokio_postgres::Error| HostError::Invalid(format!("column {i}: {e}"));
    let value = match ty {
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(bad)?
            .map(Value::Boolean),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(bad)?
            .map(|v| Value::Int64(v.into())),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(bad)?
            .map(|v| Value::Int64(v.into())),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(bad)?
            .map(Value::Int64),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)
            .map_err(bad)?
            .map(|v| Value::Float64(v.into())),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)
            .map_err(bad)?
            .map(Value::Float64),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map_err(bad)?
            .map(Value::Bytes),
        Type::JSON | Type::JSONB => row
            .try_get::<_, Option<serde_json::Value>>(i)
            .map_err(bad)?
            .map(|v| Value::Json(v.to_string())),
        ref t if <String as tokio_postgres::types::FromSql>::accepts(t) => row
            .try_get::<_, Option<String>>(i)
            .map_err(bad)?
            .map(Value::Text),
        t => {
            return Err(HostError::Invalid(format!(
                "column {:?} has type {t}, which the postgres interface does not carry; \
                 cast it in SQL (e.g. `::text`)",
                row.columns()[i].name()
            )))
        }
    };
    Ok(value.unwrap_or(Value::Null))
}

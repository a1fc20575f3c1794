//! `GET /api/v1/budget`: how much of a key's spending limits is used and how much is left,
//! read from the counters `jetcall::budget` keeps, so a caller can pace a catalogue import
//! instead of finding out from a `402 budget_exceeded`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use jetcall::budget::Period;
use jetcall::config::Role;
use jetcall::cost::{Cost, Currency};

use crate::error::{ApiError, ErrorBody};
use crate::keys::Caller;
use crate::state::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WhoseBudget {
    /// The tenant (an API key's `name`) whose budget to show; by default the caller's own. Only
    /// an operator's key may name another.
    pub tenant: Option<String>,
}

/// A tenant's spending limits and what its jobs hold against them.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    /// The tenant: the API key's `name`; `null` when the API has no keys, and so no budgets.
    tenant: Option<String>,
    /// Each limited period, day before month; empty for a key without a budget.
    periods: Vec<PeriodView>,
}

/// One period's limit, at the moment of the answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct PeriodView {
    period: Period,
    /// The UTC day (`2026-12-07`) or month (`2026-12`) counted.
    key: String,
    limit: Cost,
    /// What the limit is held against: the cost of the period's finished jobs, and the
    /// reservations of its jobs not finished yet (each the most its job can cost).
    used: Cost,
    /// The limit less `used`, at least 0: a job whose reservation is larger is refused.
    remaining: Cost,
    /// When the period ends and its budget starts again.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    resets_at: OffsetDateTime,
}

/// A tenant's budget: the limits of its key and what is used of them. Reservations count as
/// used until their jobs finish, so `remaining` is what new jobs may reserve.
#[utoipa::path(
    get,
    path = "/api/v1/budget",
    operation_id = "budget",
    tag = "jobs",
    params(WhoseBudget),
    responses(
        (status = 200, description = "The tenant's limits per period, what is used and what remains", body = BudgetView),
        (status = 403, description = "A key that is not an operator's named another tenant (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No API key has this name (`not_found`)", body = ErrorBody),
        (status = 422, description = "The query is not `tenant=<name>` (`invalid_field`)", body = ErrorBody),
        (status = 503, description = "NATS did not answer (`unavailable`)", body = ErrorBody, headers(("retry-after" = u32, description = "Seconds to wait"))),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn budget(
    State(state): State<AppState>,
    caller: Option<Extension<Arc<Caller>>>,
    query: Result<Query<WhoseBudget>, QueryRejection>,
) -> Result<Json<BudgetView>, ApiError> {
    let Query(query) = query.map_err(|err| {
        ApiError::invalid_field(
            "query",
            format!(
                "name a tenant with `tenant`, or nothing: {}",
                err.body_text()
            ),
        )
    })?;
    let caller = caller.as_deref().map(Arc::as_ref);
    let Some(tenant) = tenant_asked(&state, caller, query.tenant)? else {
        return Ok(Json(BudgetView {
            tenant: None,
            periods: Vec::new(),
        }));
    };
    let mut periods = Vec::new();
    if let Some(limits) = state.config.gateway.budget_of(&tenant) {
        let now = OffsetDateTime::now_utc();
        for (period, limit) in [
            (Period::Day, limits.per_day),
            (Period::Month, limits.per_month),
        ] {
            let Some(limit) = limit else { continue };
            let key = period.key(now);
            let used = state
                .topology
                .budgets
                .total(&tenant, period, &key)
                .await
                .map_err(|err| ApiError::NatsUnavailable(err.to_string()))?;
            // A settlement racing a reservation's release may dip below 0 for a moment.
            let used = u64::try_from(used.max(0)).unwrap_or(u64::MAX);
            periods.push(PeriodView {
                period,
                key,
                limit: usd(limit),
                used: usd(used),
                remaining: usd(limit.saturating_sub(used)),
                resets_at: period.resets_at(now),
            });
        }
    }
    Ok(Json(BudgetView {
        tenant: Some(tenant),
        periods,
    }))
}

/// Whose budget `caller` may see, given the `tenant` it named: its own unless it is an
/// operator's key; `None` when the API has no keys and none was named.
fn tenant_asked(
    state: &AppState,
    caller: Option<&Caller>,
    named: Option<String>,
) -> Result<Option<String>, ApiError> {
    let operator = caller.is_none_or(|caller| caller.role() == Role::Admin);
    match (named, caller) {
        (Some(named), Some(caller)) if !operator && named != caller.name => Err(
            ApiError::Forbidden("a key that is not an operator's sees its own budget only".into()),
        ),
        (Some(named), _) => {
            if state.config.gateway.tenants().contains(&named) {
                Ok(Some(named))
            } else {
                Err(ApiError::NotFound(format!(
                    "no API key is named `{}`",
                    named.chars().take(64).collect::<String>()
                )))
            }
        }
        (None, caller) => Ok(caller.map(|caller| caller.name.clone())),
    }
}

fn usd(microdollars: u64) -> Cost {
    Cost {
        microdollars,
        currency: Currency::Usd,
    }
}

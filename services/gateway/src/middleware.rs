//! What every API request passes through before its handler: counted and timed, its body
//! read within its deadline and a place taken among `gateway.max_in_flight`, and its API key
//! checked.

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::extract::buffer_body;
use crate::state::AppState;

/// Counts and times every request to a known route.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .request(route, method, response.status().as_u16(), started.elapsed());
    response
}

/// Reads the request's body within `gateway.body_timeout` and only then takes a place among
/// `gateway.max_in_flight`: an upload that stalls holds no place, so slow or abandoned uploads
/// cannot turn every other caller away, and it is cut off (`408`) at its deadline.
pub async fn limit_in_flight(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let request = match buffer_body(request, &state).await {
        Ok(request) => request,
        Err(refused) => return refused.into_response(),
    };
    match state.in_flight.try_enter("requests") {
        Ok(_permit) => next.run(request).await,
        Err(overloaded) => overloaded.into_response(),
    }
}

/// With keys configured, only a known key gets through, within its own request rate; the
/// caller travels on as a request extension for the key's callback allowlist.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.keys.is_empty() {
        return next.run(request).await;
    }
    let caller = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|key| state.keys.identify(key.trim()));
    let Some(caller) = caller else {
        return ApiError::Unauthorized.into_response();
    };
    if let Err(limited) = caller.spend() {
        return limited.into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

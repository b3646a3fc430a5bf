//! The two router-wide request layers, as plain tower services.
//!
//! axum's `middleware::from_fn` clones the service it wraps on every request (one heap
//! allocation per request). These call the inner service in place: the router is always ready,
//! and `poll_ready` is passed through. They run around the router (see `router`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use futures::future::{Either, Map, Ready, ready};
use tower::{Layer, Service};

use super::{AppState, RequestStart};

type Answer = Result<Response, Infallible>;

fn answer<R: IntoResponse, E: Into<Infallible>>(r: Result<R, E>) -> Answer {
    r.map(IntoResponse::into_response).map_err(Into::into)
}

/// The inner service's readiness, its error (none: routes are infallible) as ours.
fn ready_inner<S: Service<Request>>(
    inner: &mut S,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Infallible>>
where
    S::Error: Into<Infallible>,
{
    inner.poll_ready(cx).map_err(Into::into)
}

/// [`super::supported_encoding`] in front of every route.
#[derive(Clone, Copy)]
pub(crate) struct EncodingCheckLayer;

impl<S> Layer<S> for EncodingCheckLayer {
    type Service = EncodingCheck<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EncodingCheck { inner }
    }
}

#[derive(Clone)]
pub(crate) struct EncodingCheck<S> {
    inner: S,
}

type Mapped<S> = Map<
    <S as Service<Request>>::Future,
    fn(Result<<S as Service<Request>>::Response, <S as Service<Request>>::Error>) -> Answer,
>;

impl<S> Service<Request> for EncodingCheck<S>
where
    S: Service<Request>,
    S::Response: IntoResponse,
    S::Error: Into<Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Answer>, Mapped<S>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready_inner(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match super::supported_encoding(&mut req) {
            Ok(()) => Either::Right(self.inner.call(req).map(answer as fn(_) -> _)),
            Err(refused) => Either::Left(ready(Ok(super::error::ApiError::UnsupportedMediaType(
                refused,
            )
            .into_response()))),
        }
    }
}

/// [`super::record`] around the router, given the paths it serves.
#[derive(Clone)]
pub(crate) struct RecordLayer(pub(crate) AppState, pub(crate) Arc<[&'static str]>);

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Record {
            inner,
            state: self.0.clone(),
            paths: self.1.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Record<S> {
    inner: S,
    state: AppState,
    paths: Arc<[&'static str]>,
}

impl<S> Service<Request> for Record<S>
where
    S: Service<Request>,
    S::Response: IntoResponse,
    S::Error: Into<Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready_inner(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let route = super::route_of(&self.paths, &req);
        let started = Instant::now();
        req.extensions_mut().insert(RequestStart(started));
        let state = self.state.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = answer(fut.await)?;
            Ok(super::recorded(&state, route, started, resp))
        })
    }
}

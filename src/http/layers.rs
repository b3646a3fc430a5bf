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
use tower_http::decompression::{DecompressionBody, RequestDecompression};

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

/// [`super::supported_encoding`] in front of the router; gzip and zstd bodies are decompressed
/// while streaming (the body limit applies to the decompressed bytes, so a small bomb is refused
/// with 413 without being allocated), other bodies reach the router as they are — no
/// decompression wrapper on the body of every plain request.
#[derive(Clone)]
pub(crate) struct EncodingCheck<S> {
    plain: S,
    decoding: RequestDecompression<S>,
}

impl<S: Clone> EncodingCheck<S> {
    pub(crate) fn new(inner: S) -> Self {
        EncodingCheck {
            decoding: RequestDecompression::new(inner.clone()),
            plain: inner,
        }
    }
}

type Mapped<F, R, E> = Map<F, fn(Result<R, E>) -> Answer>;

type Decoding<S> = RequestDecompression<S>;

impl<S, B> Service<Request> for EncodingCheck<S>
where
    S: Service<Request, Response = axum::http::Response<B>, Error = Infallible>
        + Service<
            axum::http::Request<DecompressionBody<axum::body::Body>>,
            Response = axum::http::Response<B>,
            Error = Infallible,
        >,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    #[allow(clippy::type_complexity)]
    type Future = Either<
        Ready<Answer>,
        Either<
            Mapped<<S as Service<Request>>::Future, axum::http::Response<B>, Infallible>,
            Mapped<
                <Decoding<S> as Service<Request>>::Future,
                <Decoding<S> as Service<Request>>::Response,
                <Decoding<S> as Service<Request>>::Error,
            >,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The router is always ready (axum's routes are).
        ready_inner(&mut self.plain, cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match super::supported_encoding(&mut req) {
            Ok(false) => Either::Right(Either::Left(
                Service::<Request>::call(&mut self.plain, req).map(answer as fn(_) -> _),
            )),
            Ok(true) => Either::Right(Either::Right(
                self.decoding.call(req).map(decoded as fn(_) -> _),
            )),
            Err(refused) => Either::Left(ready(Ok(super::error::ApiError::UnsupportedMediaType(
                refused,
            )
            .into_response()))),
        }
    }
}

fn decoded<R: IntoResponse, E: Into<axum::BoxError>>(r: Result<R, E>) -> Answer {
    Ok(match r {
        Ok(r) => r.into_response(),
        // Only the router's own error comes here, and it has none (a decompression error
        // surfaces while the body is read: a 400 from the extractor).
        Err(e) => super::error::ApiError::Invalid(vec![crate::pulse::FieldError {
            index: None,
            field: "body".into(),
            message: e.into().to_string(),
        }])
        .into_response(),
    })
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

//! Child jobs and flows a guest starts: the broker is the [`ChildEnqueuer`] the
//! Redis backend hands them to, since the broker owns the job format and
//! the queue keys. The backend defines the trait; this is its only
//! implementation.

use async_trait::async_trait;

use super::producer::Origin;
use super::{Broker, EnqueueRequest};
use crate::backend::redis::ChildEnqueuer;
use crate::backend::{BackendError, BackendResult, ChildJob, FlowRequest, StartedFlow};
use crate::failure::{Category, Failure};

#[async_trait]
impl ChildEnqueuer for Broker {
    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String> {
        let payload = serde_json::from_str(&child.payload)
            .map_err(|e| BackendError::Invalid(format!("child payload: {e}")))?;
        let request = EnqueueRequest {
            tenant: tenant.to_string(),
            task: child.task,
            payload,
            countdown: child.countdown,
            idempotency_key: child.idempotency_key,
            traceparent: child.traceparent,
            ..EnqueueRequest::default()
        };
        match self.enqueue_as(request, Origin::Child).await {
            Ok(e) => Ok(e.id),
            Err(e) => match e.downcast_ref::<Failure>() {
                Some(f) if f.category == Category::Denied => {
                    Err(BackendError::Denied(f.message.clone()))
                }
                Some(f) => Err(BackendError::Invalid(f.to_string())),
                None => Err(crate::backend::redis::classify("child enqueue", &e)),
            },
        }
    }

    async fn start_flow(&self, tenant: &str, request: FlowRequest) -> BackendResult<StartedFlow> {
        let started = self.start_flow_for_job(tenant, &request).await;
        started.map_err(|e| match e.downcast_ref::<Failure>() {
            Some(f) if f.category == Category::Denied => BackendError::Denied(f.message.clone()),
            Some(f) => BackendError::Invalid(f.to_string()),
            None => crate::backend::redis::classify("flow start", &e),
        })
    }
}

//! `berth.network.v1.Networks` over [`NetworkService`]: unwrap, convert, run on a blocking
//! thread, convert back.

use std::sync::Arc;

use berth_proto::berth::network::v1 as pb;
use berth_proto::berth::network::v1::networks_server::Networks;
use berth_proto::berth::types::v1::Filter;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::service::{AttachRequest, CniAttachRequest, CreateNetwork, NetworkService};

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct NetworksApi {
    service: Arc<NetworkService>,
}

impl NetworksApi {
    /// Serves `service`.
    pub fn new(service: Arc<NetworkService>) -> Self {
        Self { service }
    }
}

async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> berth_core::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("network task failed: {e}")))?
        .map_err(Status::from)
}

fn filters(f: Vec<Filter>) -> Vec<(String, String)> {
    f.into_iter().map(|f| (f.key, f.value)).collect()
}

#[tonic::async_trait]
impl Networks for NetworksApi {
    async fn create(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::CreateNetworkResponse>, Status> {
        let req = CreateNetwork::try_from(request.into_inner())?;
        let svc = self.service.clone();
        let (info, warning) = blocking(move || svc.create_network(req)).await?;
        Ok(Response::new(pb::CreateNetworkResponse {
            network: Some((&info).into()),
            warning,
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetNetworkRequest>,
    ) -> Result<Response<pb::GetNetworkResponse>, Status> {
        let id = request.into_inner().id;
        let svc = self.service.clone();
        let info = blocking(move || svc.get_network(&id)).await?;
        Ok(Response::new(pb::GetNetworkResponse {
            network: Some((&info).into()),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let f = filters(request.into_inner().filters);
        let svc = self.service.clone();
        let list = blocking(move || svc.list_networks(&f)).await?;
        Ok(Response::new(pb::ListNetworksResponse {
            networks: list.iter().map(Into::into).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<()>, Status> {
        let id = request.into_inner().id;
        let svc = self.service.clone();
        blocking(move || svc.delete_network(&id)).await?;
        Ok(Response::new(()))
    }

    async fn prune(
        &self,
        request: Request<pb::PruneNetworksRequest>,
    ) -> Result<Response<pb::PruneNetworksResponse>, Status> {
        let f = filters(request.into_inner().filters);
        let svc = self.service.clone();
        let deleted = blocking(move || svc.prune_networks(&f)).await?;
        Ok(Response::new(pb::PruneNetworksResponse { deleted }))
    }

    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let req = AttachRequest::try_from(request.into_inner())?;
        let svc = self.service.clone();
        let info = blocking(move || svc.attach(req)).await?;
        Ok(Response::new(pb::AttachResponse {
            attachment: Some((&info).into()),
        }))
    }

    async fn detach(
        &self,
        request: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let r = request.into_inner();
        let svc = self.service.clone();
        let network_ids =
            blocking(move || svc.detach(&r.container_id, &r.network, r.force)).await?;
        Ok(Response::new(pb::DetachResponse { network_ids }))
    }

    async fn list_attachments(
        &self,
        request: Request<pb::ListAttachmentsRequest>,
    ) -> Result<Response<pb::ListAttachmentsResponse>, Status> {
        let r = request.into_inner();
        let svc = self.service.clone();
        let list = blocking(move || svc.list_attachments(&r.container_id, &r.network)).await?;
        Ok(Response::new(pb::ListAttachmentsResponse {
            attachments: list.iter().map(Into::into).collect(),
        }))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let r = request.into_inner();
        let svc = self.service.clone();
        let found = blocking(move || svc.lookup(&r.name, &r.network, &r.from_container_id)).await?;
        Ok(Response::new(pb::LookupResponse {
            ipv4_addresses: found.ipv4.iter().map(ToString::to_string).collect(),
            ipv6_addresses: found.ipv6.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn list_cni_configs(
        &self,
        _request: Request<pb::ListCniConfigsRequest>,
    ) -> Result<Response<pb::ListCniConfigsResponse>, Status> {
        let svc = self.service.clone();
        let configs = blocking(move || svc.cni_configs()).await?;
        Ok(Response::new(pb::ListCniConfigsResponse {
            configs: configs.iter().map(Into::into).collect(),
        }))
    }

    async fn cni_attach(
        &self,
        request: Request<pb::CniAttachRequest>,
    ) -> Result<Response<pb::CniAttachResponse>, Status> {
        let req = CniAttachRequest::try_from(request.into_inner())?;
        let svc = self.service.clone();
        let (result, raw) = blocking(move || svc.cni_attach(req)).await?;
        Ok(Response::new(convert::cni_response(&result, &raw)))
    }

    async fn cni_detach(
        &self,
        request: Request<pb::CniDetachRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let svc = self.service.clone();
        blocking(move || svc.cni_detach(&r.container_id, &r.config_name, &r.interface_name))
            .await?;
        Ok(Response::new(()))
    }
}

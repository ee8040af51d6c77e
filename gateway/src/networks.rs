//! `/networks/...`: networks live in berth-network; connect and disconnect go through the engine,
//! which owns the container side.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_core::{Error, ErrorKind};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::network::v1 as network;
use bollard_stubs::models::{
    NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest,
};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::containers::create::endpoint_request;
use crate::errors::{container_not_found, parse_json};
use crate::query::Query;
use crate::{ApiError, AppState, json_response, time};

/// The network routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/networks", get(list))
        .route("/networks/create", post(create))
        .route("/networks/prune", post(prune))
        .route("/networks/{id}", get(inspect).delete(remove))
        .route("/networks/{id}/connect", post(connect))
        .route("/networks/{id}/disconnect", post(disconnect))
}

/// A network as Docker shows it; `containers` includes the attached endpoints.
pub fn network_json(n: &network::Network, containers: bool) -> Value {
    let ipam = n.ipam.clone().unwrap_or_default();
    let config: Vec<Value> = ipam
        .pools
        .iter()
        .map(|p| {
            let mut c = json!({"Subnet": p.subnet});
            if !p.gateway.is_empty() {
                c["Gateway"] = json!(p.gateway);
            }
            if !p.ip_range.is_empty() {
                c["IPRange"] = json!(p.ip_range);
            }
            if !p.aux_addresses.is_empty() {
                c["AuxiliaryAddresses"] = json!(p.aux_addresses);
            }
            c
        })
        .collect();
    let driver = if n.driver.is_empty() {
        "bridge"
    } else {
        n.driver.as_str()
    };
    let eps: serde_json::Map<String, Value> = if containers {
        n.containers
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    json!({
                        "Name": e.name,
                        "EndpointID": e.endpoint_id,
                        "MacAddress": e.mac_address,
                        "IPv4Address": e.ipv4_address,
                        "IPv6Address": e.ipv6_address,
                    }),
                )
            })
            .collect()
    } else {
        serde_json::Map::new()
    };
    json!({
        "Name": n.name,
        "Id": n.id,
        "Created": time::rfc3339(n.created.as_ref()),
        "Scope": if n.scope.is_empty() { "local" } else { n.scope.as_str() },
        "Driver": driver,
        "EnableIPv6": n.enable_ipv6,
        "IPAM": {
            "Driver": if ipam.driver.is_empty() { "default" } else { ipam.driver.as_str() },
            "Options": if ipam.options.is_empty() { Value::Null } else { json!(ipam.options) },
            "Config": config,
        },
        "Internal": n.internal,
        "Attachable": n.attachable,
        "Ingress": false,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": eps,
        "Options": n.options,
        "Labels": n.labels,
    })
}

fn network_not_found(input: &str) -> impl FnOnce(Error) -> Error + use<> {
    let input = input.to_string();
    move |err| {
        if err.is(ErrorKind::NotFound) {
            Error::not_found(format!("network {input} not found"))
        } else {
            err
        }
    }
}

async fn list(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let nets = st
        .backends
        .networks
        .list(network::ListNetworksRequest {
            filters: q.filters()?,
        })
        .await?;
    let out: Vec<Value> = nets.iter().map(|n| network_json(n, false)).collect();
    Ok(json_response(StatusCode::OK, &out))
}

async fn inspect(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let n = st
        .backends
        .networks
        .get(network::GetNetworkRequest { id: id.clone() })
        .await
        .map_err(network_not_found(&id))?;
    Ok(json_response(StatusCode::OK, &network_json(&n, true)))
}

/// A Docker network create body → berth-network's request.
pub fn create_request(body: &[u8]) -> Result<network::CreateNetworkRequest, Error> {
    let req: NetworkCreateRequest = parse_json(body)?;
    if req.name.is_empty() {
        return Err(Error::invalid_argument("network name cannot be empty"));
    }
    let ipam = req.ipam.map(|i| network::Ipam {
        driver: i.driver.unwrap_or_default(),
        pools: i
            .config
            .unwrap_or_default()
            .into_iter()
            .map(|c| network::IpamPool {
                subnet: c.subnet.unwrap_or_default(),
                gateway: c.gateway.unwrap_or_default(),
                ip_range: c.ip_range.unwrap_or_default(),
                aux_addresses: c.auxiliary_addresses.unwrap_or_default(),
            })
            .collect(),
        options: i.options.unwrap_or_default(),
    });
    Ok(network::CreateNetworkRequest {
        name: req.name,
        driver: req.driver.unwrap_or_default(),
        ipam,
        enable_ipv6: req.enable_ipv6.unwrap_or(false),
        internal: req.internal.unwrap_or(false),
        attachable: req.attachable.unwrap_or(false),
        labels: req.labels.unwrap_or_default(),
        options: req.options.unwrap_or_default(),
        check_duplicate: true,
    })
}

async fn create(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req = create_request(&body)?;
    let name = req.name.clone();
    let resp = st.backends.networks.create(req).await.map_err(|err| {
        if err.is(ErrorKind::AlreadyExists) {
            Error::already_exists(format!("network with name {name} already exists"))
        } else {
            err
        }
    })?;
    let id = resp.network.map(|n| n.id).unwrap_or_default();
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"Id": id, "Warning": resp.warning}),
    ))
}

async fn remove(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    st.backends
        .networks
        .delete(network::DeleteNetworkRequest { id: id.clone() })
        .await
        .map_err(network_not_found(&id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn connect_error(network: &str, container: &str) -> impl FnOnce(Error) -> Error + use<> {
    let (network, container) = (network.to_string(), container.to_string());
    move |err| {
        if err.is(ErrorKind::NotFound) && err.message().to_ascii_lowercase().contains("network") {
            Error::not_found(format!("network {network} not found"))
        } else {
            container_not_found(&container)(err)
        }
    }
}

async fn connect(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NetworkConnectRequest = parse_json(&body)?;
    if req.container.is_empty() {
        return Err(Error::invalid_argument("container name or id is required").into());
    }
    let endpoint = req.endpoint_config.as_ref().map(endpoint_request);
    st.backends
        .containers
        .connect_network(engine::ConnectNetworkRequest {
            id: req.container.clone(),
            network: id.clone(),
            endpoint,
        })
        .await
        .map_err(connect_error(&id, &req.container))?;
    Ok(StatusCode::OK.into_response())
}

async fn disconnect(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NetworkDisconnectRequest = parse_json(&body)?;
    if req.container.is_empty() {
        return Err(Error::invalid_argument("container name or id is required").into());
    }
    st.backends
        .containers
        .disconnect_network(engine::DisconnectNetworkRequest {
            id: req.container.clone(),
            network: id.clone(),
            force: req.force.unwrap_or(false),
        })
        .await
        .map_err(connect_error(&id, &req.container))?;
    Ok(StatusCode::OK.into_response())
}

async fn prune(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let deleted = st
        .backends
        .networks
        .prune(network::PruneNetworksRequest {
            filters: q.filters()?,
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"NetworksDeleted": deleted}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;

    #[tokio::test]
    async fn network_routes() {
        let f = Fake::default();
        let body = json!({"Name": "appnet", "Driver": "bridge", "IPAM": {"Config": [{"Subnet": "10.9.0.0/24", "Gateway": "10.9.0.1"}]}, "Labels": {"x": "y"}});
        let r = f
            .request("POST", "/networks/create", body.to_string())
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let id = r.json()["Id"].as_str().unwrap().to_string();
        let r = f
            .request("POST", "/networks/create", body.to_string())
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(r.message(), "network with name appnet already exists");
        let r = f
            .request("POST", "/networks/create", r#"{"Name": ""}"#)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("GET", "/networks", "").await;
        assert_eq!(r.json()[0]["Name"], "appnet");
        let r = f
            .request("GET", &format!("/networks/{}", &id[..10]), "")
            .await;
        let v = r.json();
        assert_eq!(v["Id"], id);
        assert_eq!(
            v["IPAM"]["Config"],
            json!([{"Subnet": "10.9.0.0/24", "Gateway": "10.9.0.1"}])
        );
        assert_eq!(v["IPAM"]["Driver"], "default");
        assert_eq!(v["Labels"], json!({"x": "y"}));
        let r = f.request("GET", "/networks/nosuch", "").await;
        assert_eq!(r.message(), "network nosuch not found");

        f.add_container("web", engine::ContainerStatus::Running);
        let r = f
            .request(
                "POST",
                "/networks/appnet/connect",
                r#"{"Container": "web", "EndpointConfig": {"Aliases": ["www"], "IPAMConfig": {"IPv4Address": "10.9.0.9"}}}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let ep = f.state().containers[0].networks["appnet"].clone();
        assert_eq!(ep.aliases, ["www"]);
        assert_eq!(ep.ipv4_address, "10.9.0.9");
        let r = f
            .request(
                "POST",
                "/networks/appnet/connect",
                r#"{"Container": "ghost"}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.message(), "No such container: ghost");
        let r = f
            .request("POST", "/networks/nonet/connect", r#"{"Container": "web"}"#)
            .await;
        assert_eq!(r.message(), "network nonet not found");
        let r = f
            .request(
                "POST",
                "/networks/appnet/disconnect",
                r#"{"Container": "web", "Force": false}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let r = f.request("POST", "/networks/appnet/connect", "{bad").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("DELETE", "/networks/appnet", "").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = f.request("DELETE", "/networks/appnet", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = f.request("POST", "/networks/prune", "").await;
        assert_eq!(r.json(), json!({"NetworksDeleted": ["old"]}));
    }
}

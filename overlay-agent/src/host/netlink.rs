//! A small typed netlink API: the few link, address and route operations the agent needs, hiding
//! rtnetlink's message builders.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkMessage},
    },
};

/// Errors of netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {source}")]
    Connect {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No interface has this name.
    #[error("no interface named {name}")]
    NoSuchLink {
        /// The name looked up.
        name: String,
    },
    /// The kernel refused a request.
    #[error("{operation}: {source}")]
    Request {
        /// What was asked, for the log.
        operation: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

/// What the agent needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// MTU.
    pub mtu: u32,
    /// Hardware address (empty for L3 devices such as TUN).
    pub mac: Vec<u8>,
}

/// A netlink connection in the calling thread's network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Connect { source })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Looks an interface up by name.
    pub async fn link(&self, name: &str) -> Result<LinkInfo, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(link_info(&msg)),
            Ok(None) => Err(NetlinkError::NoSuchLink { name: name.into() }),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(NetlinkError::NoSuchLink { name: name.into() })
            }
            Err(source) => Err(NetlinkError::Request {
                operation: format!("looking up {name}"),
                source,
            }),
        }
    }

    /// Sets an interface's MTU and brings it up.
    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                operation: format!("setting MTU {mtu} and up on interface {index}"),
                source,
            })
    }

    /// Makes `addr/prefix_len` the only IPv4 address of the interface: a lease that moved leaves no
    /// stale address behind.
    pub async fn set_only_ipv4(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let mut existing = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut present = false;
        let mut stale = Vec::new();
        while let Some(msg) = existing
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                operation: format!("listing addresses of interface {index}"),
                source,
            })?
        {
            let ours = msg.header.prefix_len == prefix_len
                && msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == addr));
            let is_v4 = msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(_))));
            if ours {
                present = true;
            } else if is_v4 {
                stale.push(msg);
            }
        }
        for msg in stale {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|source| NetlinkError::Request {
                    operation: format!("removing a stale address of interface {index}"),
                    source,
                })?;
        }
        if !present {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), prefix_len)
                .execute()
                .await
                .map_err(|source| NetlinkError::Request {
                    operation: format!("adding {addr}/{prefix_len} to interface {index}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Adds or replaces the route `dst/prefix_len dev index`.
    pub async fn replace_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        index: u32,
    ) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                operation: format!("routing {dst}/{prefix_len} to interface {index}"),
                source,
            })
    }
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        mtu: 0,
        mac: Vec::new(),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(mac) => info.mac.clone_from(mac),
            _ => {}
        }
    }
    info
}

//! IPv4 subnets: the one type every side of the overlay uses, defined in `overlay-common`.

pub use overlay_common::net::{Subnet, SubnetError};

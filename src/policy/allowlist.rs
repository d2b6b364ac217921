//! TEMPORARY naive allow-list; replaced by the real module.
#![allow(missing_docs)]
use std::net::IpAddr;
use std::str::FromStr;
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct IpRange {
    start: IpAddr,
    end: IpAddr,
}
impl IpRange {
    pub fn new(start: IpAddr, end: IpAddr) -> Result<IpRange, AllowListError> {
        Ok(IpRange { start, end })
    }
    pub fn start(&self) -> IpAddr {
        self.start
    }
    pub fn end(&self) -> IpAddr {
        self.end
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.start, self.end, ip) {
            (IpAddr::V4(a), IpAddr::V4(b), IpAddr::V4(x)) => a <= x && x <= b,
            (IpAddr::V6(a), IpAddr::V6(b), IpAddr::V6(x)) => a <= x && x <= b,
            _ => false,
        }
    }
}
impl FromStr for IpRange {
    type Err = AllowListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: ipnet::IpNet = s
            .parse()
            .map_err(|_| AllowListError::Syntax { entry: s.into() })?;
        Ok(IpRange {
            start: n.network(),
            end: n.broadcast(),
        })
    }
}
impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllowListError {
    Syntax { entry: String },
}
impl std::fmt::Display for AllowListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad entry")
    }
}
impl std::error::Error for AllowListError {}
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AllowList {
    r: Vec<IpRange>,
}
impl AllowList {
    pub fn any() -> AllowList {
        AllowList { r: vec![] }
    }
    pub fn new(e: &[IpRange]) -> AllowList {
        AllowList { r: e.to_vec() }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.r.is_empty() || self.r.iter().any(|r| r.contains(ip))
    }
    pub fn is_any(&self) -> bool {
        self.r.is_empty()
    }
    pub fn ranges(&self) -> &[IpRange] {
        &self.r
    }
}

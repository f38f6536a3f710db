//! Ferry's client of the HPE Morpheus REST API, which HPE Morpheus VM Essentials (VME)
//! managers speak: OAuth password login (`/oauth/token`, client `morph-api`) renewed with
//! the refresh token, bearer calls retried with backoff on 5xx answers and timeouts, TLS
//! verified by default, and errors that quote the API's own message with the call and
//! what to do.
//!
//! Modules by workflow step: [`iam`] (step 1: the `ferry-migration` role and its service
//! user), [`inventory`] (placement discovery and validation), [`provision`] (virtual
//! images, instances and their power, waiting for final states). Paths and bodies follow the
//! official OpenAPI document (8.1.2); the test double checks every request against it.

mod client;
mod error;
pub mod iam;
pub mod inventory;
pub mod provision;

pub use client::{Client, ClientOptions, Login, Paging, CLIENT_ID};
pub use error::MorpheusError;

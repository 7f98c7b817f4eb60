//! Test fixtures shared by the integration tests and benchmarks:
//! identity providers to test against, and a harness that runs the broker.

pub mod backend;
pub mod bench;
pub mod broker_process;
pub mod dot;
pub mod fake_idp;
pub mod go_toolchain;
pub mod html_form;
pub mod matrix;
pub mod oidc_provider;
pub mod scenario;

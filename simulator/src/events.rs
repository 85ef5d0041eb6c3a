//! The log streams of a simulated campaign: those the campaign runtime
//! writes (the campaign, its pipeline's input and outputs, its model
//! feedback), named by [`smartmsg_service::streams::CampaignStreams`].

pub use smartmsg_domain::driver::{Feedback as ModelFed, FEEDBACK_KIND as MODEL_FED};
pub use smartmsg_service::streams::CampaignStreams as Streams;

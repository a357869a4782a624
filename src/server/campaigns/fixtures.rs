//! Records for the campaign engine's table tests.

use crate::server::store::{
    CAMPAIGN_SCHEMA, CampaignMember, CampaignRecord, CampaignStatus, CampaignTargets, MemberStatus,
};

/// A live two-wave campaign (50 %, 100 %) to 1.0.2 with one retry.
pub fn campaign(status: CampaignStatus) -> CampaignRecord {
    CampaignRecord {
        schema: CAMPAIGN_SCHEMA,
        id: "c1".into(),
        name: "n".into(),
        device_type: "gateway".into(),
        version: "1.0.2".into(),
        targets: CampaignTargets::default(),
        waves: vec![50.0, 100.0],
        success_threshold: 100.0,
        failure_percent: 100.0,
        failure_min_count: 1,
        max_in_flight: 50,
        start_at_ms: 0,
        window: None,
        force: false,
        retries: 1,
        dynamic: false,
        status,
        status_reason: None,
        failures_acknowledged: 0,
        started_at_ms: Some(0),
        ended_at_ms: None,
        created_at_ms: 0,
        updated_at_ms: 0,
        brake: None,
    }
}

/// A member with task 1.
pub fn member(id: &str, wave: u32, status: MemberStatus, attempts: u32) -> CampaignMember {
    CampaignMember {
        schema: CAMPAIGN_SCHEMA,
        campaign_id: "c1".into(),
        device_id: id.into(),
        wave,
        status,
        task_id: Some(1),
        attempts,
        next_attempt_ms: 90_000,
        note: Some("retrying after DOWNLOAD_FAILED: cut".into()),
        updated_at_ms: 0,
    }
}

/// A registered gateway on `version`.
pub fn device(id: &str, version: &str) -> crate::server::store::DeviceRecord {
    crate::server::store::DeviceRecord {
        schema: 1,
        id: id.into(),
        protocol: crate::protocol::Protocol::Gateway,
        device_type: "gateway".into(),
        secret_hash: String::new(),
        tags: Vec::new(),
        firmware_version: Some(version.into()),
        delta_formats: Vec::new(),
        last_seen_ms: None,
        last_ip: None,
        registered: true,
        created_at_ms: 0,
    }
}

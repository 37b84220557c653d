//! SUBSCRIBE and UNSUBSCRIBE: filter validation, the authorization request
//! ([`Action::AuthorizeSubscribe`]) and its answer ([`Session::handle_subscribe_authorized`]),
//! the subscription quota, the SUBACK, and the retained-message requests that follow it.
//!
//! # Invariants
//! - `subscriptions` is keyed by the filter text and never holds more than
//!   `subscriptions_max` filters; re-subscribing to a filter replaces it (not counted twice).
//! - At most `PENDING_SUBSCRIBES_MAX` SUBSCRIBE packets await authorization, each under its
//!   own packet id; the SUBACK has one verdict per filter, in the packet's order.
//! - Only valid, non-shared filters are sent for authorization; a filter is subscribed only
//!   when the driver allowed it.
//! - [`Action::SendRetained`] follows the SUBACK (MQTT-3.8.4), as v5 Retain Handling allows.

use std::num::{NonZeroU16, NonZeroU32};

use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

use super::{Action, PENDING_SUBSCRIBES_MAX, Packet, Session, Version, reasons};
use crate::topic::{SHARED_SUBSCRIPTION_PREFIX, TopicFilter};

/// One granted subscription.
#[derive(Clone, Debug)]
pub(super) struct Subscription {
    pub(super) filter: TopicFilter,
    pub(super) qos: QoS,
    pub(super) options: Options,
    /// When the filter was first granted (ms since the Unix epoch, the driver's clock): a
    /// persistent session owes the messages stored since then on channels it has no cursor
    /// for.
    pub(super) since_ms: u64,
}

/// The v5 subscription options the session acts on (v3: all false, retained sent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Options {
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    /// v5 Subscription Identifier of the SUBSCRIBE, sent back with every delivery it matches.
    pub(super) subscription_id: Option<NonZeroU32>,
    /// v5 Retain Handling: 0 send retained at subscribe, 1 only for a new subscription, 2
    /// never.
    pub(super) retain_handling: u8,
}

/// One filter of a SUBSCRIBE as the client asked for it.
pub(super) struct Request {
    filter: String,
    qos: QoS,
    options: Options,
}

/// A SUBSCRIBE awaiting its authorization.
#[derive(Clone, Debug)]
pub(super) struct PendingSubscribe {
    /// Per filter of the packet: a verdict already, or the requested options awaiting
    /// authorization.
    entries: Vec<SubscribeEntry>,
}

#[derive(Clone, Debug)]
enum SubscribeEntry {
    Refused(Refusal),
    Authorizing {
        filter: TopicFilter,
        qos: QoS,
        options: Options,
    },
}

/// Why one filter of a SUBSCRIBE was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    NotAuthorized,
    TopicFilterInvalid,
    SharedNotSupported,
    QuotaExceeded,
}

/// The requests of a v3 SUBSCRIBE (no options: the defaults).
pub(super) fn v3_requests(topic_filters: Vec<(impl ToString, QoS)>) -> Vec<Request> {
    topic_filters
        .into_iter()
        .map(|(filter, qos)| Request {
            filter: filter.to_string(),
            qos,
            options: Options::default(),
        })
        .collect()
}

/// The requests of a v5 SUBSCRIBE.
pub(super) fn v5_requests(
    topic_filters: Vec<(impl ToString, v5::SubscriptionOptions)>,
    subscription_id: Option<NonZeroU32>,
) -> Vec<Request> {
    topic_filters
        .into_iter()
        .map(|(filter, options)| Request {
            filter: filter.to_string(),
            qos: options.qos,
            options: Options {
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                subscription_id,
                retain_handling: options.retain_handling.into(),
            },
        })
        .collect()
}

impl Session {
    /// The answer to [`Action::AuthorizeSubscribe`]: one verdict per filter, in order;
    /// `now_ms` is the time of the grant (ms since the Unix epoch).
    pub fn handle_subscribe_authorized(
        &mut self,
        packet_id: NonZeroU16,
        allowed: Vec<bool>,
        now_ms: u64,
    ) {
        if self.is_closed() {
            return;
        }
        let pending = self
            .pending_subscribes
            .remove(&packet_id)
            .expect("an answer to a pending Action::AuthorizeSubscribe");
        let mut verdicts = allowed.into_iter();
        let mut results = Vec::with_capacity(pending.entries.len());
        let mut retained = Vec::new();
        for entry in pending.entries {
            let result = match entry {
                SubscribeEntry::Refused(refusal) => Err(refusal),
                SubscribeEntry::Authorizing {
                    filter,
                    qos,
                    options,
                } => {
                    let allowed = verdicts.next().expect("one verdict per filter");
                    let since_ms = self
                        .subscriptions
                        .get(filter.as_str())
                        .map(|existing| existing.since_ms);
                    let existed = since_ms.is_some();
                    if !allowed {
                        Err(Refusal::NotAuthorized)
                    } else if !existed && self.subscriptions.len() >= self.config.subscriptions_max
                    {
                        Err(Refusal::QuotaExceeded)
                    } else {
                        let send_retained = match options.retain_handling {
                            0 => true,
                            1 => !existed,
                            _ => false,
                        };
                        if send_retained {
                            retained.push(filter.clone());
                        }
                        self.subscriptions.insert(
                            filter.as_str().to_owned(),
                            Subscription {
                                filter: filter.clone(),
                                qos,
                                options,
                                since_ms: since_ms.unwrap_or(now_ms),
                            },
                        );
                        // A persistent session's SUBACK waits until the subscription is saved.
                        self.mark_dirty();
                        self.actions.push_back(Action::Subscribe { filter, qos });
                        Ok(qos)
                    }
                }
            };
            results.push(result);
        }
        let suback = match self.version {
            Version::V3 => Packet::V3(v3::Packet::SubscribeAck {
                packet_id,
                status: results.iter().map(reasons::v3_suback).collect(),
            }),
            Version::V5 => Packet::V5(v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id,
                properties: Vec::new(),
                reason_string: None,
                status: results.iter().map(reasons::v5_suback).collect(),
            })),
        };
        self.send(suback);
        // After the SUBACK (MQTT-3.8.4: retained messages follow the subscription).
        for filter in retained {
            self.actions.push_back(Action::SendRetained { filter });
        }
    }

    pub(super) fn on_subscribe(&mut self, packet_id: NonZeroU16, requests: Vec<Request>) {
        if self.pending_subscribes.contains_key(&packet_id) {
            return self.protocol_error("a SUBSCRIBE packet id still in use");
        }
        if self.pending_subscribes.len() >= PENDING_SUBSCRIBES_MAX {
            return self.close(
                DisconnectReasonCode::QuotaExceeded,
                "too many SUBSCRIBE packets awaiting an answer",
            );
        }
        let mut to_authorize = Vec::new();
        let entries = requests
            .into_iter()
            .map(|request| {
                if request.filter.starts_with(SHARED_SUBSCRIPTION_PREFIX) {
                    return SubscribeEntry::Refused(Refusal::SharedNotSupported);
                }
                match TopicFilter::parse(&request.filter) {
                    Ok(filter) => {
                        to_authorize.push(filter.clone());
                        SubscribeEntry::Authorizing {
                            filter,
                            qos: request.qos,
                            options: request.options,
                        }
                    }
                    Err(_) => SubscribeEntry::Refused(Refusal::TopicFilterInvalid),
                }
            })
            .collect();
        self.pending_subscribes
            .insert(packet_id, PendingSubscribe { entries });
        self.actions.push_back(Action::AuthorizeSubscribe {
            packet_id,
            filters: to_authorize,
        });
    }

    pub(super) fn on_unsubscribe(&mut self, packet_id: NonZeroU16, filters: &[impl AsRef<str>]) {
        let mut statuses = Vec::with_capacity(filters.len());
        for text in filters {
            match self.subscriptions.remove(text.as_ref()) {
                Some(subscription) => {
                    self.mark_dirty();
                    self.actions.push_back(Action::Unsubscribe {
                        filter: subscription.filter,
                    });
                    statuses.push(v5::UnsubscribeAckReason::Success);
                }
                None => statuses.push(v5::UnsubscribeAckReason::NoSubscriptionExisted),
            }
        }
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::UnsubscribeAck { packet_id }),
            Version::V5 => Packet::V5(v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id,
                properties: Vec::new(),
                reason_string: None,
                status: statuses,
            })),
        });
    }
}

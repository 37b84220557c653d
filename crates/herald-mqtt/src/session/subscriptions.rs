//! SUBSCRIBE and UNSUBSCRIBE: filter validation, the authorization request
//! ([`Action::AuthorizeSubscribe`]) and its answer ([`Session::handle_subscribe_authorized`]),
//! the subscription quota, the SUBACK, and the retained-message requests that follow it.
//!
//! # Invariants
//! - `subscriptions` is keyed by the filter text and never holds more than
//!   `subscriptions_max` filters; re-subscribing to a filter replaces it (not counted twice).
//! - At most `PENDING_SUBSCRIBES_MAX` SUBSCRIBE packets await authorization, each under its
//!   own packet id; the SUBACK has one verdict per filter, in the packet's order.
//! - Only valid filters are sent for authorization (of a shared subscription, its filter
//!   part); a filter is subscribed only when the driver allowed it.
//! - A shared subscription (`$share/{name}/{filter}`) is kept under its full text; its
//!   messages come from its group ([`Action::SubscribeShared`]), it gets no retained messages,
//!   and No Local on it is a protocol error (MQTT-3.8.3-4).
//! - [`Action::SendRetained`] follows the SUBACK (MQTT-3.8.4), as v5 Retain Handling allows.

use std::num::{NonZeroU16, NonZeroU32};

use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

use super::{Action, PENDING_SUBSCRIBES_MAX, Packet, Session, Version, reasons};
use crate::topic::{self, SHARED_SUBSCRIPTION_PREFIX, TopicFilter};

/// One granted subscription.
#[derive(Clone, Debug)]
pub(super) struct Subscription {
    /// The filter (of a shared subscription: the part after `$share/{name}/`).
    pub(super) filter: TopicFilter,
    /// The share name of a shared subscription (`$share/{name}/{filter}`): its messages come
    /// from the group ([`Session::handle_shared_delivery`]), never from the connection's feed.
    pub(super) share: Option<String>,
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
        /// The filter text as subscribed (the key of the subscription).
        key: String,
        filter: TopicFilter,
        share: Option<String>,
        qos: QoS,
        options: Options,
    },
}

/// Why one filter of a SUBSCRIBE was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    NotAuthorized,
    TopicFilterInvalid,
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
                    key,
                    filter,
                    share,
                    qos,
                    options,
                } => {
                    let allowed = verdicts.next().expect("one verdict per filter");
                    let since_ms = self
                        .subscriptions
                        .get(&key)
                        .map(|existing| existing.since_ms);
                    let existed = since_ms.is_some();
                    if !allowed {
                        Err(Refusal::NotAuthorized)
                    } else if !existed && self.subscriptions.len() >= self.config.subscriptions_max
                    {
                        Err(Refusal::QuotaExceeded)
                    } else {
                        // Shared subscriptions never get retained messages (MQTT 4.8.2).
                        let send_retained = share.is_none()
                            && match options.retain_handling {
                                0 => true,
                                1 => !existed,
                                _ => false,
                            };
                        if send_retained {
                            retained.push(filter.clone());
                        }
                        self.subscriptions.insert(
                            key.clone(),
                            Subscription {
                                filter: filter.clone(),
                                share: share.clone(),
                                qos,
                                options,
                                since_ms: since_ms.unwrap_or(now_ms),
                            },
                        );
                        // A persistent session's SUBACK waits until the subscription is saved.
                        self.mark_dirty();
                        self.actions.push_back(match share {
                            None => Action::Subscribe { filter, qos },
                            Some(share) => Action::SubscribeShared { key, share, filter },
                        });
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
        if requests.iter().any(|request| {
            request.options.no_local && request.filter.starts_with(SHARED_SUBSCRIPTION_PREFIX)
        }) {
            return self.protocol_error("No Local on a shared subscription (MQTT-3.8.3-4)");
        }
        let mut to_authorize = Vec::new();
        let entries = requests
            .into_iter()
            .map(|request| {
                let parsed = match topic::parse_shared(&request.filter) {
                    Ok(Some((share, filter))) => Ok((Some(share), filter)),
                    Ok(None) => TopicFilter::parse(&request.filter).map(|filter| (None, filter)),
                    Err(error) => Err(error),
                };
                match parsed {
                    Ok((share, filter)) => {
                        to_authorize.push(filter.clone());
                        SubscribeEntry::Authorizing {
                            key: request.filter,
                            filter,
                            share,
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
                    self.actions.push_back(match subscription.share {
                        None => Action::Unsubscribe {
                            filter: subscription.filter,
                        },
                        Some(_) => Action::UnsubscribeShared {
                            key: text.as_ref().to_owned(),
                        },
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

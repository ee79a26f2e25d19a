/**
 * Failures of a dispatched request, one class each, gathered in `errors` (as nats.js does). `status` is the HTTP
 * status a gateway should answer with; `code` is stable for logs and OpenAI-style error bodies.
 *
 * @module
 */
import type { ErrorCode } from "./protocol.ts";

export abstract class DispatchError extends Error {
  abstract readonly status: number;
  abstract readonly code: string;
  constructor(
    message: string,
    /** The request this failure belongs to. */
    readonly requestId: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The request is invalid before it leaves (bad pool name, invalid parameters, duplicate id). */
export class InvalidRequestError extends DispatchError {
  readonly status = 400;
  readonly code = "invalid_request";
}

/** The request message is larger than a worker accepts (MAX_REQUEST_BYTES) or NATS carries (max_payload). */
export class RequestTooLargeError extends DispatchError {
  readonly status = 413;
  readonly code = "request_too_large";
}

/** No worker pool: its stream or durable consumer does not exist (or NATS did not answer in time). */
export class NoWorkersError extends DispatchError {
  readonly status = 503;
  readonly code = "no_workers";
}

/** No worker started the request before its deadline. */
export class QueueTimeoutError extends DispatchError {
  readonly status = 504;
  readonly code = "queue_timeout";
}

/** A worker started the request, then went silent longer than the heartbeat timeout (died or got cut off). */
export class WorkerLostError extends DispatchError {
  readonly status = 502;
  readonly code = "worker_lost";
}

/** The event stream broke the protocol: a sequence gap, an invalid event, a second worker starting. */
export class ProtocolError extends DispatchError {
  readonly status = 502;
  readonly code = "protocol_error";
}

/** The worker answered with an `error` event; `code` is the worker's. */
export class WorkerError extends DispatchError {
  readonly status: number;
  constructor(
    readonly code: ErrorCode,
    message: string,
    requestId: string,
  ) {
    super(message, requestId);
    this.status = WORKER_ERROR_STATUS[code];
  }
}

const WORKER_ERROR_STATUS: Record<ErrorCode, number> = {
  bad_request: 400,
  context_length_exceeded: 400,
  unsupported_version: 400,
  too_large: 413,
  model_not_found: 404,
  deadline_exceeded: 504,
  unavailable: 503,
  worker_lost: 502,
  internal: 500,
};

/** The caller aborted (signal) before the request finished. */
export class CancelledError extends DispatchError {
  readonly status = 499;
  readonly code = "cancelled";
}

export const errors = {
  DispatchError,
  InvalidRequestError,
  RequestTooLargeError,
  NoWorkersError,
  QueueTimeoutError,
  WorkerLostError,
  ProtocolError,
  WorkerError,
  CancelledError,
};

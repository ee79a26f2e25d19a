/**
 * `@llama-edge/shared`: what the gateway and the workers agree on. A hand-picked list, like nats.js' `mod.ts`.
 *
 * @module
 */
export {
  type DispatchEvent,
  Dispatcher,
  type DispatcherOptions,
  finalAfterCancel,
  queuedIdAfterOffer,
  type SubmitOptions,
  type SubmitRequest,
} from "./dispatcher.ts";
export {
  CancelledError,
  DispatchError,
  errors,
  InvalidRequestError,
  NoWorkersError,
  ProtocolError,
  QueueTimeoutError,
  RequestTooLargeError,
  WorkerError,
  WorkerLostError,
} from "./errors.ts";
export { Mailbox } from "./mailbox.ts";
export {
  type CancelMessage,
  type ChatMessage,
  type ClaimMessage,
  type ClaimReply,
  DEFAULT_HEARTBEAT_TIMEOUT_MS,
  type DirectReply,
  DirectReplySchema,
  directSubject,
  ERROR_CODES,
  type ErrorCode,
  encodeMessage,
  HEARTBEAT_INTERVAL_MS,
  isValidPoolName,
  LOAD_REPORT_INTERVAL_MS,
  type LoadReport,
  type Logprob,
  MAX_REQUEST_BYTES,
  type ParseFailure,
  type ParseResult,
  type PoolNames,
  PROTOCOL_VERSION,
  type Prompt,
  parseCancelMessage,
  parseClaimReply,
  parseLoadReport,
  parseReplyMessage,
  parseRequestMessage,
  poolNames,
  type ReplyMessage,
  type RequestMessage,
  type RequestMessageInput,
  type SamplingParams,
  type TokenEvent,
  type Usage,
} from "./protocol.ts";

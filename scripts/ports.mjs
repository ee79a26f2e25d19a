// Loopback TCP ports for the local stack and the tests.
import { connect as tcpConnect } from "node:net";

// The gateway's dev tooling picks its ports the same way.
export { freePort } from "../edge/dev/gateway.mjs";

/** Whether something accepts connections on 127.0.0.1:`port`. */
export function portInUse(port) {
  return new Promise((resolve) => {
    const s = tcpConnect({ host: "127.0.0.1", port }, () => {
      s.destroy();
      resolve(true);
    });
    s.on("error", () => resolve(false));
  });
}

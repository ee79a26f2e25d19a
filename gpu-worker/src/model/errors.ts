/**
 * A checkpoint that cannot be loaded. The message always names the file (and the tensor or field where one is
 * involved), so a user never has to read an ONNX Runtime stack trace to learn what is wrong with their directory.
 */
export class ModelLoadError extends Error {
  override name = "ModelLoadError";
  constructor(
    readonly file: string,
    message: string,
    readonly tensor?: string,
  ) {
    super(`${file}${tensor ? ` (tensor ${tensor})` : ""}: ${message}`);
  }
}

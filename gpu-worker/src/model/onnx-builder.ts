import onnxPkg from "onnx-proto";

const { onnx } = onnxPkg;

/** Element types used by the LLaMA graph (values of onnx.TensorProto.DataType). */
export const DType = { float: 1, uint8: 2, int64: 7, float16: 10 } as const;
export type DTypeCode = (typeof DType)[keyof typeof DType];

type Dim = number | string;
/** Integers, int lists and strings as they are; floats wrapped as `{ float: x }` (1.0 would look like an int). */
type AttrValue = number | number[] | string | { float: number };

/** Where an initializer's bytes live: an external data file next to the graph (no 2 GB protobuf limit). */
export interface ExternalRef {
  location: string;
  offset: number;
  length: number;
}

/**
 * A small builder over onnx-proto: named values in, named values out, one node per call. It exists so the
 * LLaMA graph reads like a forward pass instead of protobuf plumbing.
 */
export class GraphBuilder {
  private readonly nodes: onnxPkg.onnx.INodeProto[] = [];
  private readonly inputs: onnxPkg.onnx.IValueInfoProto[] = [];
  private readonly outputs: onnxPkg.onnx.IValueInfoProto[] = [];
  private readonly initializers: onnxPkg.onnx.ITensorProto[] = [];
  private readonly constants = new Map<string, string>();
  private counter = 0;

  input(name: string, type: DTypeCode, dims: Dim[]): string {
    this.inputs.push(valueInfo(name, type, dims));
    return name;
  }

  output(name: string, type: DTypeCode, dims: Dim[]): void {
    this.outputs.push(valueInfo(name, type, dims));
  }

  /** An initializer whose data is in an external file (weights never enter the protobuf). */
  external(name: string, type: DTypeCode, dims: number[], ref: ExternalRef): string {
    this.initializers.push({
      name,
      dims,
      dataType: type,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: "location", value: ref.location },
        { key: "offset", value: String(ref.offset) },
        { key: "length", value: String(ref.length) },
      ],
    });
    return name;
  }

  /** A small int64 constant (shapes, axes, offsets), deduplicated by value. */
  ints(values: number[], scalar = false): string {
    const key = `${scalar ? "s" : "v"}:${values.join(",")}`;
    const found = this.constants.get(key);
    if (found) return found;
    const name = `const_${this.constants.size}`;
    this.initializers.push({ name, dims: scalar ? [] : [values.length], dataType: DType.int64, int64Data: values });
    this.constants.set(key, name);
    return name;
  }

  /** A float32 scalar constant. */
  float(value: number): string {
    const key = `f:${value}`;
    const found = this.constants.get(key);
    if (found) return found;
    const name = `constf_${this.constants.size}`;
    this.initializers.push({ name, dims: [], dataType: DType.float, floatData: [value] });
    this.constants.set(key, name);
    return name;
  }

  /** Add a node; returns its output names (one per `numOutputs`), or the given `outputs` names. */
  node(
    op: string,
    inputs: string[],
    attrs: Record<string, AttrValue> = {},
    opts: { outputs?: string[]; numOutputs?: number; domain?: string; name?: string } = {},
  ): string[] {
    const id = this.counter++;
    const outputs = opts.outputs ?? Array.from({ length: opts.numOutputs ?? 1 }, (_, i) => `${op}_${id}_${i}`);
    this.nodes.push({
      opType: op,
      domain: opts.domain ?? "",
      name: opts.name ?? `${op}_${id}`,
      input: inputs,
      output: outputs,
      attribute: Object.entries(attrs).map(([name, v]) => attribute(name, v)),
    });
    return outputs;
  }

  /** Single-output shorthand. */
  op(op: string, inputs: string[], attrs: Record<string, AttrValue> = {}, output?: string, domain?: string): string {
    return this.node(op, inputs, attrs, { ...(output ? { outputs: [output] } : {}), ...(domain ? { domain } : {}) })[0];
  }

  build(name: string): Uint8Array {
    const model = onnx.ModelProto.create({
      // IR 10 / opset 23: RMSNormalization is a standard op from opset 23 on. com.microsoft holds
      // FusedMatMul (matmul with a transposed operand), which ONNX Runtime implements on CPU and CUDA.
      irVersion: 10,
      opsetImport: [
        { domain: "", version: 23 },
        { domain: "com.microsoft", version: 1 },
      ],
      producerName: "llama-edge",
      graph: {
        name,
        node: this.nodes,
        input: this.inputs,
        output: this.outputs,
        initializer: this.initializers,
      },
    });
    return onnx.ModelProto.encode(model).finish();
  }
}

function valueInfo(name: string, type: DTypeCode, dims: Dim[]): onnxPkg.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: type,
        shape: { dim: dims.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

function attribute(name: string, v: AttrValue): onnxPkg.onnx.IAttributeProto {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof v === "string") return { name, type: T.STRING, s: new TextEncoder().encode(v) };
  if (Array.isArray(v)) return { name, type: T.INTS, ints: v };
  if (typeof v === "object") return { name, type: T.FLOAT, f: v.float };
  if (!Number.isInteger(v)) throw new Error(`attribute ${name}: wrap float values as { float: x }`);
  return { name, type: T.INT, i: v };
}

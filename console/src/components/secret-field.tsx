import { useId, useState } from "preact/hooks";
import { type SessionName, useSession } from "../session.ts";

/**
 * A password field for the API key or the admin secret, kept in sessionStorage for this tab. Browsers are asked
 * not to save or autofill it; a Forget button clears it.
 */
export function SecretField(props: { label: string; session: SessionName; placeholder: string; help: string }) {
  const [value, setValue] = useSession(props.session);
  const [shown, setShown] = useState(false);
  const id = useId();
  const input = {
    id,
    value,
    placeholder: props.placeholder,
    autocomplete: "off",
    spellcheck: false,
    "aria-describedby": `${id}-help`,
    onInput: (e: Event) => setValue((e.currentTarget as HTMLInputElement).value.trim()),
  };
  return (
    <div class="field secret">
      <label for={id}>{props.label}</label>
      <div class="row">
        {shown ? <input type="text" {...input} /> : <input type="password" {...input} />}
        <button type="button" class="secondary" aria-pressed={shown} onClick={() => setShown(!shown)}>
          {shown ? "Hide" : "Show"}
        </button>
        <button type="button" class="secondary" disabled={!value} onClick={() => setValue("")}>
          Forget
        </button>
      </div>
      <p id={`${id}-help`} class="help">
        {props.help}
      </p>
    </div>
  );
}

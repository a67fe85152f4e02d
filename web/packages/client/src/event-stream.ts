/**
 * A parser for `text/event-stream` (the Server-Sent Events wire format), fed chunks of text as
 * they arrive: lines end with LF, CR or CRLF (a CRLF may be split across chunks), a blank line
 * ends an event, `data:` lines are joined with LF, `:` lines are comments, and one space after
 * the colon is dropped. Events without data are not dispatched, as in a browser.
 */

export interface StreamEvent {
  /** `message` when the event named none. */
  event: string;
  data: string;
  /** The event's `id:` (null when it had none). */
  id: string | null;
}

export class EventStreamParser {
  private buf = '';
  private skipLf = false;
  private event = '';
  private data: string[] = [];
  private id: string | null = null;
  /** Comment lines seen (the server's keep-alives). */
  comments = 0;

  /** Feeds a chunk; returns the events it completed, in order. */
  push(chunk: string): StreamEvent[] {
    const out: StreamEvent[] = [];
    let text = chunk;
    if (this.skipLf && text.startsWith('\n')) text = text.slice(1);
    this.skipLf = false;
    this.buf += text;
    let start = 0;
    for (let i = 0; i < this.buf.length; i++) {
      const c = this.buf[i];
      if (c !== '\n' && c !== '\r') continue;
      this.line(this.buf.slice(start, i), out);
      if (c === '\r') {
        if (i + 1 === this.buf.length) this.skipLf = true;
        else if (this.buf[i + 1] === '\n') i++;
      }
      start = i + 1;
    }
    this.buf = this.buf.slice(start);
    return out;
  }

  private line(line: string, out: StreamEvent[]): void {
    if (line === '') {
      if (this.data.length) out.push({ event: this.event || 'message', data: this.data.join('\n'), id: this.id });
      this.event = '';
      this.data = [];
      this.id = null;
      return;
    }
    if (line.startsWith(':')) {
      this.comments++;
      return;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.id = value;
  }
}

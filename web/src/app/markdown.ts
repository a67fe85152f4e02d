/**
 * Bot replies as Markdown: `marked` (GitHub-flavoured: lists, tables, code) turns the text into
 * HTML, and DOMPurify keeps only inert markup. Raw HTML in a reply is shown as text, never
 * parsed; links may only be http(s), mailto or relative, and open in a new tab with
 * `rel="noopener noreferrer"`; images become links (a reply must not make the browser fetch
 * anything by itself). Code blocks get a Copy button. User messages never come here: they are
 * plain text.
 */

import DOMPurify from 'dompurify';
import { Marked } from 'marked';
import { copyToClipboard, h } from './dom';

const escapeHtml = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

const SAFE_URL = /^(https?:|mailto:|#|\/(?!\/)|\.{0,2}\/)/i;

const marked = new Marked({
  gfm: true,
  breaks: true,
  async: false,
  renderer: {
    // Raw HTML (block or inline) is shown as the text it is.
    html({ text }) {
      return escapeHtml(text);
    },
    image({ href, text }) {
      const label = escapeHtml(text || href);
      return SAFE_URL.test(href) ? `<a href="${escapeHtml(href)}">${label}</a>` : label;
    },
  },
});

const purify = DOMPurify();
purify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    const href = node.getAttribute('href');
    if (href !== null && !SAFE_URL.test(href.trim())) node.removeAttribute('href');
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

const ALLOWED_TAGS = [
  'p',
  'br',
  'hr',
  'h1',
  'h2',
  'h3',
  'h4',
  'h5',
  'h6',
  'strong',
  'em',
  'del',
  's',
  'code',
  'pre',
  'blockquote',
  'ul',
  'ol',
  'li',
  'a',
  'table',
  'thead',
  'tbody',
  'tr',
  'th',
  'td',
  'input',
];
const ALLOWED_ATTR = ['href', 'title', 'start', 'align', 'type', 'checked', 'disabled', 'class'];

/** The reply as sanitised nodes, ready to put in a message body. */
export function renderMarkdown(text: string): DocumentFragment {
  const html = marked.parse(text) as string;
  const frag = purify.sanitize(html.trim(), { ALLOWED_TAGS, ALLOWED_ATTR, RETURN_DOM_FRAGMENT: true }) as DocumentFragment;
  // Task-list checkboxes are for show.
  for (const box of frag.querySelectorAll('input')) {
    if (box.getAttribute('type') !== 'checkbox') box.remove();
    else box.setAttribute('disabled', '');
  }
  for (const pre of frag.querySelectorAll('pre')) {
    const code = pre.textContent ?? '';
    const copy = h(
      'button',
      {
        type: 'button',
        class: 'small secondary copy-code',
        'data-testid': 'copy-code',
        'aria-label': 'Copy the code',
        onclick: async () => {
          copy.textContent = (await copyToClipboard(code)) ? 'Copied' : 'Copy failed';
          setTimeout(() => (copy.textContent = 'Copy'), 2000);
        },
      },
      'Copy',
    );
    const block = h('div', { class: 'code-block' });
    pre.replaceWith(block);
    block.append(pre, copy);
  }
  return frag;
}
